"""The ControlNet pipeline of a base model's family: loading (one ``from_pretrained`` path for every family),
placing on a device, and one batched call.

The family comes from the base folder's ``model_index.json``; its Backbone class names the pipeline, ControlNet,
multi-ControlNet and VAE classes, the extra pipeline arguments, the samplers and the call's argument names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..backbones import pipelines
from ..backbones.base import load_part
from ..errors import SkingenError
from .jobs import ImageJob, SamplingSettings, controls_for, load_control_image

# Sampler names -> diffusers scheduler classes (SDXL's DDPM samplers and the flow-matching ones; see pipelines).
SCHEDULERS = pipelines.ALL_SCHEDULERS
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What a failed load of the pipeline or a ControlNet at inference expects instead.
LOAD_HELP = ("expected a diffusers folder as `python scripts/make_tiny_pipeline.py --backbone sdxl|sd3|flux --out DIR "
             "--controlnet` writes (the pipeline, and the ControlNet in DIR/controlnet)")


def scheduler_class(name: str):
    import diffusers

    if name not in SCHEDULERS:
        raise SkingenError(f"--scheduler {name!r}: unknown scheduler; choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name])


def make_scheduler(name: str, base_config: dict):
    """The named scheduler with the base pipeline's noise schedule (betas, timestep spacing) from ``base_config``."""
    return scheduler_class(name).from_config(base_config)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise SkingenError(f"--device {device!r}: not a torch device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SkingenError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return resolved


def load_controlnet_pipeline(
    pretrained_model_name_or_path: str | os.PathLike,
    controlnet_model_name_or_path: Sequence[str | os.PathLike],
    *,
    vae_model_name_or_path: str | os.PathLike | None = None,
    variant: str | None = None,
    scheduler: str | None = None,
    dtype: str = "fp32",
    device: str | torch.device | None = None,
    enable_xformers_memory_efficient_attention: bool = False,
    enable_model_cpu_offload: bool = False,
    torch_compile: bool = False,
    lora: str | os.PathLike | None = None,
):
    """The base model's ControlNet pipeline, loaded once: ``model_index.json`` decides the family
    (``StableDiffusionXLControlNetPipeline``, ``StableDiffusion3ControlNetPipeline``, ``FluxControlNetPipeline``;
    several ControlNets: the family's multi-ControlNet). ``scheduler`` None: the family's default sampler (UniPC for
    SDXL, flow-matching Euler for SD3/FLUX). ``lora``: a LoRA folder or file in diffusers' format (e.g. the trainer's
    ``--unet_lora_rank`` output) loaded with ``pipeline.load_lora_weights``. See ``place_pipeline`` for the runtime
    options."""
    if not controlnet_model_name_or_path:
        raise SkingenError("--controlnet: give at least one ControlNet folder (e.g. the output of training)")
    scheduler_class(scheduler or "unipc")  # an unknown name fails before any model is loaded
    _check_runtime(
        dtype,
        resolve_device(None if device is None else str(device)),
        enable_xformers_memory_efficient_attention,
        enable_model_cpu_offload,
    )
    family = pipelines.family_of_pipeline(pretrained_model_name_or_path)
    scheduler = scheduler or family.default_scheduler
    pipelines.check_scheduler(family, scheduler)
    local_base = Path(pretrained_model_name_or_path).expanduser()
    for path in controlnet_model_name_or_path:
        if local_base.is_dir():
            # Training's architecture check: the family's ControlNet class, sizes that fit the base's denoiser.
            pipelines.check_controlnet_for_pipeline(path, local_base, flag="--controlnet")
        else:  # a hub id: the family from the ControlNet's own config
            pipelines.check_controlnet_family(family, path)
    pipeline = load_family_pipeline(family, pretrained_model_name_or_path, controlnet_model_name_or_path,
                                    vae_model_name_or_path=vae_model_name_or_path, variant=variant, scheduler=scheduler)
    if lora is not None:
        load_lora(pipeline, lora)
    return place_pipeline(
        pipeline,
        dtype=dtype,
        device=device,
        enable_xformers_memory_efficient_attention=enable_xformers_memory_efficient_attention,
        enable_model_cpu_offload=enable_model_cpu_offload,
        torch_compile=torch_compile,
    )


def load_lora(pipeline, lora: str | os.PathLike) -> None:
    """``pipeline.load_lora_weights(lora)``; a missing or unreadable LoRA is a SkingenError naming it."""
    path = Path(lora).expanduser()
    if not path.exists():
        raise SkingenError(f"--lora {lora}: not found; give the training output folder holding "
                           "pytorch_lora_weights.safetensors (or that file)")
    try:
        if path.is_file():
            pipeline.load_lora_weights(str(path.parent), weight_name=path.name)
        else:
            pipeline.load_lora_weights(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise SkingenError(f"--lora {lora}: could not load it as a diffusers LoRA ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); is it one for this base model?") from None


def load_scheduler(name: str, pretrained_model_name_or_path: str | os.PathLike):
    """The named scheduler configured from a pipeline's ``scheduler/scheduler_config.json``."""
    cls = scheduler_class(name)
    try:
        config = cls.load_config(str(pretrained_model_name_or_path), subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise SkingenError(
            f"{pretrained_model_name_or_path}/scheduler: could not read the scheduler config ({str(err).splitlines()[0]}); "
            "expected a diffusers pipeline folder (SDXL, SD3/SD3.5 or FLUX.1)"
        ) from None
    return cls.from_config(config)


def load_family_pipeline(
    family: pipelines.Family,
    pretrained_model_name_or_path: str | os.PathLike,
    controlnet_model_name_or_path: Sequence[str | os.PathLike],
    *,
    vae_model_name_or_path: str | os.PathLike | None = None,
    variant: str | None = None,
    scheduler: str,
):
    """The family's ControlNet pipeline through diffusers' ``from_pretrained``, as the real weights load
    (``load_controlnet_pipeline`` has checked the ControlNets against the base). The sampler is configured from
    the base's own ``scheduler/`` config."""
    import diffusers

    base = str(Path(pretrained_model_name_or_path).expanduser())
    if not Path(base).exists():
        base = str(pretrained_model_name_or_path)  # a hub id
    controlnet_class = getattr(diffusers, family.controlnet_model)
    controlnets = [
        load_part(f"{family.title} ControlNet", str(path), controlnet_class.from_pretrained, layout_help=LOAD_HELP)
        for path in controlnet_model_name_or_path
    ]
    extra = dict(family.pipeline_kwargs)
    if vae_model_name_or_path is not None:
        vae_class = getattr(diffusers, family.vae_model)
        extra["vae"] = load_part("VAE", str(vae_model_name_or_path), vae_class.from_pretrained, layout_help=LOAD_HELP)
    if len(controlnets) > 1 and not family.multi_controlnet_model:
        raise SkingenError(f"--controlnet: {family.title} pipelines take one ControlNet (diffusers has no multi-ControlNet "
                           "for it); give one folder")
    controlnet = (
        controlnets[0] if len(controlnets) == 1 else getattr(diffusers, family.multi_controlnet_model)(controlnets)
    )
    pipeline_class = getattr(diffusers, family.controlnet_pipeline)
    pipeline = load_part(f"{family.title} pipeline", base, pipeline_class.from_pretrained, layout_help=LOAD_HELP,
                         controlnet=controlnet, variant=variant, **extra)
    pipeline.scheduler = load_scheduler(scheduler, base)
    if family.encodes_control:
        _encode_controls_with_mode(pipeline.vae)
    return pipeline


def _encode_controls_with_mode(vae) -> None:
    """Make this VAE's ``encode(...).latent_dist.sample()`` return the distribution's mode.

    The SD3/FLUX ControlNet pipelines encode the control image with ``latent_dist.sample()``; SD3's draws from the
    global RNG, so an image would depend on the batch it was made in and on earlier calls. The mode is what the
    trainer feeds the ControlNet (skingen.backbones), and these pipelines encode nothing else with the VAE.
    """
    encode = vae.encode

    def encode_with_mode(*args, **kwargs):
        output = encode(*args, **kwargs)
        distribution = output.latent_dist if hasattr(output, "latent_dist") else output[0]
        distribution.sample = lambda generator=None: distribution.mode()
        return output

    vae.encode = encode_with_mode


def _check_runtime(dtype: str, device: torch.device, xformers: bool, offload: bool) -> None:
    from diffusers.utils import is_xformers_available

    if dtype not in DTYPES:
        raise SkingenError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if offload and device.type != "cuda":
        raise SkingenError("--enable_model_cpu_offload moves models between CPU and GPU; it needs --device cuda")
    if xformers and not is_xformers_available():
        raise SkingenError(
            "--enable_xformers_memory_efficient_attention: xformers is not installed; `pip install xformers`, "
            "or drop the flag (PyTorch's scaled-dot-product attention is used by default)"
        )


def place_pipeline(
    pipeline,
    *,
    dtype: str = "fp32",
    device: str | torch.device | None = None,
    enable_xformers_memory_efficient_attention: bool = False,
    enable_model_cpu_offload: bool = False,
    torch_compile: bool = False,
):
    """Cast and move a pipeline for inference.

    Everything lives on ``device`` unless CPU offload is asked for (models stay on the CPU and move to the GPU
    one at a time: less memory, slower). Attention is PyTorch SDPA unless xformers is asked for;
    ``torch_compile`` compiles the UNet and ControlNet (the first call of each new shape is slow).
    """
    device = resolve_device(None if device is None else str(device))
    _check_runtime(dtype, device, enable_xformers_memory_efficient_attention, enable_model_cpu_offload)
    denoiser = pipelines.family_of_pipeline_object(pipeline).denoiser  # "unet" or "transformer"
    if getattr(pipeline, denoiser).dtype != DTYPES[dtype]:
        pipeline.to(dtype=DTYPES[dtype])
    if enable_model_cpu_offload:
        pipeline.enable_model_cpu_offload(device=device)
    else:
        pipeline.to(device=device)
    if enable_xformers_memory_efficient_attention:
        pipeline.enable_xformers_memory_efficient_attention()
    if torch_compile:
        setattr(pipeline, denoiser, torch.compile(getattr(pipeline, denoiser)))
        pipeline.controlnet = torch.compile(pipeline.controlnet)
    pipeline.set_progress_bar_config(disable=True)  # one bar for the whole run instead of one per call
    return pipeline


def controlnet_count(pipeline) -> int:
    controlnet = getattr(pipeline.controlnet, "_orig_mod", pipeline.controlnet)
    return len(controlnet.nets) if hasattr(controlnet, "nets") else 1


def controlnet_inputs(pipeline) -> list[int]:
    """How many control images each ControlNet takes (a ControlNet trained on n conditioning columns: 3n channels)."""
    controlnet = getattr(pipeline.controlnet, "_orig_mod", pipeline.controlnet)
    nets = controlnet.nets if hasattr(controlnet, "nets") else [controlnet]
    return [max(1, getattr(getattr(net, "_orig_mod", net).config, "conditioning_channels", 3) // 3) for net in nets]


def controlnet_inputs_of(paths: Sequence[str | os.PathLike]) -> list[int]:
    """:func:`controlnet_inputs` from the ControlNet folders' config.json, before loading them (hub ids: 1)."""
    inputs = []
    for path in paths:
        config = Path(path).expanduser() / "config.json"
        try:
            channels = json.loads(config.read_text(encoding="utf-8")).get("conditioning_channels", 3)
        except (OSError, ValueError):
            channels = 3
        inputs.append(max(1, int(channels or 3) // 3))
    return inputs


def per_controlnet(values: Sequence[float], count: int, flag: str) -> list[float]:
    """One value per ControlNet: a single value is used for all of them."""
    values = list(values)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise SkingenError(
            f"{flag}: got {len(values)} values for {count} ControlNet(s); give one value, or one per --controlnet"
        )
    return values


def generate_batch(pipeline, jobs: Sequence[ImageJob], settings: SamplingSettings) -> list[Image.Image]:
    """Generate one image per job in a single pipeline call (all jobs must share one size).

    Each image gets its own CPU ``torch.Generator``: its starting noise (and the noise of ancestral samplers)
    depends only on its seed, so the same seed gives the same image at any batch size and on any device.
    """
    if len({(job.height, job.width) for job in jobs}) != 1:
        raise ValueError("generate_batch: all jobs of one call must have the same height and width")
    family = pipelines.family_of_pipeline_object(pipeline)
    if settings.negative_prompt is not None and not family.negative_prompt:
        raise SkingenError(
            f"--negative_prompt: {family.title} ControlNet pipelines sample with distilled guidance "
            "(--guidance_scale) and no negative prompt; drop the flag"
        )
    count = controlnet_count(pipeline)
    inputs = controlnet_inputs(pipeline)
    height, width = jobs[0].height, jobs[0].width
    # Control images go in as one (batch, 3, H, W) tensor per ControlNet: the pipeline takes a batch of PIL images
    # for a single ControlNet only, and tensors give both cases the same preprocessing. SDXL's ControlNet reads
    # [0, 1]; the flow families' pipelines pass a tensor to their VAE as it is, so it must already be in [-1, 1],
    # as their own preprocessing of a PIL image makes it and as training encodes it.
    processor = getattr(pipeline, "control_image_processor", None) or _vae_range_processor()
    # A ControlNet trained on several conditioning images takes them stacked on channels, in column order.
    groups = [
        torch.cat([
            processor.preprocess([load_control_image(controls_for(job.row, inputs, k)[i]) for job in jobs],
                                 height=height, width=width)
            for i in range(inputs[k])
        ], dim=1)
        for k in range(count)
    ]
    scales = per_controlnet(settings.controlnet_conditioning_scale, count, "--controlnet_conditioning_scale")
    starts = per_controlnet(settings.control_guidance_start, count, "--control_guidance_start")
    ends = per_controlnet(settings.control_guidance_end, count, "--control_guidance_end")
    window = (starts[0], ends[0]) if count == 1 else (starts, ends)
    if not family.control_guidance_arguments and (any(s != 0.0 for s in starts) or any(e != 1.0 for e in ends)):
        raise SkingenError(f"--control_guidance_start/--control_guidance_end: {family.controlnet_pipeline} applies the "
                           "ControlNet at every step; drop the flags")
    negative_prompt = settings.negative_prompt if settings.negative_prompt is not None else family.default_negative_prompt
    result = pipeline(
        prompt=[job.row.prompt for job in jobs],
        # None: the family's default (SDXL's zeroed negative embedding, SD3's empty prompt); a string is encoded.
        **({} if negative_prompt is None else {"negative_prompt": [negative_prompt] * len(jobs)}),
        **{family.control_image_argument: groups[0] if count == 1 else groups},
        height=height,
        width=width,
        num_inference_steps=settings.num_inference_steps,
        **{family.guidance_argument: settings.guidance_scale},
        controlnet_conditioning_scale=scales[0] if count == 1 else scales,
        **dict(zip(family.control_guidance_arguments, window)),  # the ControlNet's guidance window, where taken
        generator=[torch.Generator(device="cpu").manual_seed(job.seed) for job in jobs],
        output_type="pil",  # latents stay on the device until the final decode
    )
    return result.images


def _vae_range_processor():
    """Control images as [-1, 1] tensors, for the pipelines (SD3, FLUX, Z-Image, Qwen-Image) that VAE-encode a
    tensor control image without preprocessing it."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(do_normalize=True, do_convert_rgb=True)
