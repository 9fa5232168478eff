"""The inference pipeline of each backbone family (SDXL, SD3/SD3.5, FLUX.1), chosen from the model folder.

A diffusers pipeline folder names its class in ``model_index.json`` (``_class_name``); that decides which
ControlNet pipeline, ControlNet class, multi-ControlNet wrapper and samplers apply. A :class:`Family` is a view of
one Backbone class's attributes (the backbone owns its family), so adding a family adds nothing here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SkingenError
from .flow_matching import FLOW_SCHEDULERS
from .registry import FAMILIES as REGISTRY
from .registry import backbone_class


@dataclass(frozen=True)
class Family:
    """The diffusers classes and defaults of one backbone family at inference: a view of its Backbone class."""

    name: str  # sdxl | sd3 | flux
    title: str  # for messages and model cards
    base_pipelines: tuple[str, ...]  # model_index.json _class_name values of this family's base models
    controlnet_pipeline: str
    controlnet_model: str
    multi_controlnet_model: str
    vae_model: str
    denoiser: str  # the pipeline attribute holding the frozen denoiser
    schedulers: dict[str, str] = field(default_factory=dict)
    default_scheduler: str = ""
    default_guidance_scale: float = 5.0
    guidance_argument: str = "guidance_scale"
    control_image_argument: str = "control_image"
    control_guidance_arguments: tuple[str, ...] = ()
    size_multiple: int = 8
    cuda_dtype: str = "bf16"
    negative_prompt: bool = True
    needs_negative_embeds: bool = False
    tags: tuple[str, ...] = ()
    license: str = "other"
    pipeline_kwargs: dict = field(default_factory=dict)  # extra from_pretrained arguments of the pipeline
    encodes_control: bool = False  # the pipeline encodes control images with the VAE
    default_negative_prompt: str | None = None  # sent when none is given (Qwen-Image's true CFG needs one)

    @classmethod
    def of(cls, backbone) -> Family:
        return cls(
            name=backbone.family, title=backbone.title, base_pipelines=backbone.base_pipeline_classes,
            controlnet_pipeline=backbone.pipeline_class_name, controlnet_model=backbone.controlnet_class_name,
            multi_controlnet_model=backbone.multi_controlnet_class_name, vae_model=backbone.vae_class_name,
            denoiser=backbone.denoiser_subfolder, schedulers=backbone.schedulers,
            default_scheduler=backbone.default_scheduler, default_guidance_scale=backbone.default_guidance_scale,
            guidance_argument=backbone.guidance_argument, control_image_argument=backbone.control_image_argument,
            control_guidance_arguments=backbone.control_guidance_arguments, size_multiple=backbone.size_multiple,
            cuda_dtype=backbone.cuda_dtype, negative_prompt=backbone.negative_prompt,
            needs_negative_embeds=backbone.needs_negative_embeds, tags=backbone.tags, license=backbone.license,
            pipeline_kwargs=dict(backbone.pipeline_kwargs), encodes_control=backbone.encodes_conditioning,
            default_negative_prompt=backbone.default_negative_prompt,
        )


FAMILIES: dict[str, Family] = {name: Family.of(backbone_class(name)) for name in REGISTRY}
ALL_SCHEDULERS = {name: cls for family in FAMILIES.values() for name, cls in family.schedulers.items()}


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


def check_controlnet_for_pipeline(controlnet_name_or_path, pipeline_folder, *, flag: str = "--controlnet_model_name_or_path",
                                  cache_dir: str | None = None) -> str:
    """The ControlNet architecture check for a local base pipeline folder (inference uses it as training does):
    raises ``SkingenError`` naming the ControlNet folder when it is not a ControlNet of the pipeline's family or
    does not fit its denoiser. Returns the resolved ControlNet source."""
    from .base import check_controlnet_source, read_model_config

    backbone = backbone_class(family_of_pipeline(pipeline_folder).name)
    denoiser_config = read_model_config(str(Path(pipeline_folder).expanduser() / backbone.denoiser_subfolder))
    return check_controlnet_source(backbone, controlnet_name_or_path, denoiser_config, source_of_base=str(pipeline_folder),
                                   flag=flag, cache_dir=cache_dir)


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
