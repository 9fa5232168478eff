"""The inference pipeline of each backbone family (SDXL, SD3/SD3.5, FLUX.1), chosen from the model folder.

A diffusers pipeline folder names its class in ``model_index.json`` (``_class_name``); that decides which
ControlNet pipeline, ControlNet class, multi-ControlNet wrapper and samplers apply. Everything here is names of
diffusers classes and per-family defaults, so adding a family is one more ``Family`` entry (docs/architecture.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SkingenError

# Samplers of the DDPM-trained SDXL (names users know from SDXL front-ends -> diffusers classes).
DDPM_SCHEDULERS = {
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}
# Samplers of the flow-matching families (their pipelines pass flow sigmas and FLUX's resolution shift ``mu``).
FLOW_SCHEDULERS = {"flow_euler": "FlowMatchEulerDiscreteScheduler"}


@dataclass(frozen=True)
class Family:
    """The diffusers classes and defaults of one backbone family at inference."""

    name: str  # sdxl | sd3 | flux | zimage | qwenimage
    title: str  # for messages and model cards
    base_pipelines: tuple[str, ...]  # model_index.json _class_name values of this family's base models
    controlnet_pipeline: str
    controlnet_model: str
    multi_controlnet_model: str
    denoiser: str  # the pipeline attribute holding the frozen denoiser
    schedulers: dict[str, str] = field(default_factory=dict)
    default_scheduler: str = ""
    default_guidance_scale: float = 5.0
    control_image_argument: str = "control_image"  # the pipeline-call keyword of the control image(s)
    size_multiple: int = 8  # output sides: VAE downsampling x patch or packing size
    cuda_dtype: str = "bf16"  # default dtype on CUDA
    negative_prompt: bool = True  # whether a negative prompt is used (FLUX.1-dev is guidance-distilled)
    default_negative_prompt: str | None = None  # sent when none is given (Qwen-Image's true CFG needs one)
    guidance_argument: str = "guidance_scale"  # the pipeline-call keyword the guidance scale goes to
    control_guidance_window: bool = True  # the pipeline takes control_guidance_start/end
    # Given prompt embeddings, the pipeline needs negative ones too for guidance (SDXL zeroes its own).
    needs_negative_embeds: bool = False
    tags: tuple[str, ...] = ()
    license: str = "other"  # model-card licence of ControlNets trained on the base model


FAMILIES: dict[str, Family] = {
    "sdxl": Family(
        name="sdxl",
        title="SDXL",
        base_pipelines=(
            "StableDiffusionXLPipeline",
            "StableDiffusionXLControlNetPipeline",
            "StableDiffusionXLImg2ImgPipeline",
        ),
        controlnet_pipeline="StableDiffusionXLControlNetPipeline",
        controlnet_model="ControlNetModel",
        multi_controlnet_model="MultiControlNetModel",
        denoiser="unet",
        schedulers=DDPM_SCHEDULERS,
        default_scheduler="unipc",
        default_guidance_scale=5.0,
        control_image_argument="image",
        size_multiple=8,
        cuda_dtype="fp16",
        tags=("stable-diffusion-xl",),
        license="openrail++",
    ),
    "sd3": Family(
        name="sd3",
        title="SD3",
        base_pipelines=("StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline"),
        controlnet_pipeline="StableDiffusion3ControlNetPipeline",
        controlnet_model="SD3ControlNetModel",
        multi_controlnet_model="SD3MultiControlNetModel",
        denoiser="transformer",
        schedulers=FLOW_SCHEDULERS,
        default_scheduler="flow_euler",
        default_guidance_scale=5.0,
        size_multiple=16,  # 8x VAE, 2x2 patches
        needs_negative_embeds=True,
        tags=("sd3", "sd3.5"),  # SD3.5: Stability AI Community License
    ),
    "flux": Family(
        name="flux",
        title="FLUX.1",
        base_pipelines=("FluxPipeline", "FluxControlNetPipeline"),
        controlnet_pipeline="FluxControlNetPipeline",
        controlnet_model="FluxControlNetModel",
        multi_controlnet_model="FluxMultiControlNetModel",
        denoiser="transformer",
        schedulers=FLOW_SCHEDULERS,
        default_scheduler="flow_euler",
        default_guidance_scale=3.5,  # FLUX.1-dev's distilled guidance (an input of the transformer, not CFG)
        size_multiple=16,  # 8x VAE, 2x2 packing
        negative_prompt=False,
        tags=("flux",),  # FLUX.1-dev: FLUX.1 [dev] Non-Commercial License
    ),
    "zimage": Family(
        name="zimage",
        title="Z-Image",
        base_pipelines=("ZImagePipeline", "ZImageControlNetPipeline"),
        controlnet_pipeline="ZImageControlNetPipeline",
        controlnet_model="ZImageControlNetModel",
        multi_controlnet_model="",  # diffusers has no multi-ControlNet for Z-Image
        denoiser="transformer",
        schedulers=FLOW_SCHEDULERS,
        default_scheduler="flow_euler",
        default_guidance_scale=5.0,  # the pipeline's default CFG (Z-Image-Turbo: 0)
        size_multiple=16,  # 8x VAE, 2x2 patches
        needs_negative_embeds=True,
        control_guidance_window=False,
        tags=("z-image",),
        license="apache-2.0",
    ),
    "qwenimage": Family(
        name="qwenimage",
        title="Qwen-Image",
        base_pipelines=("QwenImagePipeline", "QwenImageControlNetPipeline"),
        controlnet_pipeline="QwenImageControlNetPipeline",
        controlnet_model="QwenImageControlNetModel",
        multi_controlnet_model="QwenImageMultiControlNetModel",
        denoiser="transformer",
        schedulers=FLOW_SCHEDULERS,
        default_scheduler="flow_euler",
        default_guidance_scale=4.0,  # true_cfg_scale, the pipeline's default
        size_multiple=16,  # 8x VAE, 2x2 packing
        needs_negative_embeds=True,
        default_negative_prompt=" ",  # diffusers' Qwen-Image examples
        guidance_argument="true_cfg_scale",
        tags=("qwen-image",),
        license="apache-2.0",
    ),
}
ALL_SCHEDULERS = {**DDPM_SCHEDULERS, **FLOW_SCHEDULERS}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise SkingenError(f"unknown backbone {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_pipeline(pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None) -> Family:
    """The family of a base model folder (or hub id), from its ``model_index.json``."""
    from diffusers import DiffusionPipeline

    source = str(pretrained_model_name_or_path)
    local = Path(source).expanduser()
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise SkingenError(
            f"{local}: not a diffusers pipeline folder (no model_index.json); --pretrained_model_name_or_path takes an "
            "SDXL, SD3/SD3.5, FLUX.1, Z-Image or Qwen-Image pipeline folder; build a tiny one offline with "
            "`python scripts/make_tiny_pipeline.py --backbone sd3 --out DIR`"
        )
    where = f"{local / 'model_index.json'}" if local.exists() else f"{source} (model_index.json)"
    try:
        config = DiffusionPipeline.load_config(str(local) if local.exists() else source, revision=revision)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise SkingenError(
            f"{where}: could not read the pipeline index ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            "--pretrained_model_name_or_path must be a diffusers pipeline folder (SDXL, SD3/SD3.5, FLUX.1, Z-Image, Qwen-Image) or, "
            "online, a hub id; build a tiny one with `python scripts/make_tiny_pipeline.py --backbone sd3 --out DIR`"
        ) from None
    class_name = config.get("_class_name")
    for family in FAMILIES.values():
        if class_name in family.base_pipelines:
            return family
    known = ", ".join(name for family in FAMILIES.values() for name in family.base_pipelines[:1])
    raise SkingenError(f"{where}: pipeline class {class_name!r} is not supported; skingen generates with {known}")


def family_of_controlnet(controlnet: Any) -> Family:
    """The family a ControlNet model (or multi-ControlNet wrapper) belongs to, by its diffusers class."""
    names = {type(controlnet).__name__, type(getattr(controlnet, "_orig_mod", controlnet)).__name__}
    for family in FAMILIES.values():
        if names & {family.controlnet_model, family.multi_controlnet_model} - {""}:
            return family
    raise SkingenError(f"{sorted(names)[0]}: not a ControlNet class skingen knows (SDXL, SD3 or FLUX)")


def family_of_pipeline_object(pipeline: Any) -> Family:
    name = type(pipeline).__name__
    for family in FAMILIES.values():
        if name == family.controlnet_pipeline:
            return family
    raise SkingenError(f"{name}: not a ControlNet pipeline skingen knows")


def check_scheduler(family: Family, name: str) -> None:
    if name not in family.schedulers:
        raise SkingenError(
            f"--scheduler {name}: not a sampler for {family.title} models; choose one of {', '.join(family.schedulers)}"
            + (
                " (flow-matching models sample with flow-matching schedulers)"
                if family.schedulers is FLOW_SCHEDULERS
                else ""
            )
        )


def make_scheduler(family: Family, name: str, base_config: dict):
    """The named sampler of ``family`` configured from the base pipeline's scheduler config (noise schedule, shift)."""
    import diffusers

    check_scheduler(family, name)
    return getattr(diffusers, family.schedulers[name]).from_config(base_config)


def controlnet_class_name(folder: str | os.PathLike) -> str | None:
    """``_class_name`` from a local ControlNet folder's config.json (None when it is not a readable local folder)."""
    config = Path(folder).expanduser() / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return None


def check_controlnet_family(family: Family, folder: str | os.PathLike) -> None:
    """A ControlNet folder made for another family is an error naming both, before anything heavy is loaded."""
    class_name = controlnet_class_name(folder)
    if class_name is None or class_name == family.controlnet_model:
        return
    other = next((f for f in FAMILIES.values() if class_name == f.controlnet_model), None)
    made_for = f"a ControlNet for {other.title}" if other else f"a {class_name}"
    raise SkingenError(
        f"{Path(folder) / 'config.json'}: {made_for}, but the base model is {family.title}; "
        f"give a {family.controlnet_model} trained on this base (or the matching base model)"
    )
