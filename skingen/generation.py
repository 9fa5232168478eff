"""Batch generation with a ControlNet pipeline of any backbone family (SDXL, SD3/SD3.5, FLUX.1).

What to generate comes from a dataset split (each row's caption and conditioning image) or from
``--prompt`` / ``--control_image`` lists; each row gives ``num_images_per_prompt`` images, each with its
own seed and its own ``torch.Generator``, so an image depends only on its row and seed, never on the
batch it was generated in. Images are generated several per pipeline call, saved atomically as
``images/<row>_s<seed>.png`` and listed in ``results.jsonl`` (rewritten atomically after each batch); a
rerun skips every image already listed there whose file exists, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from . import data, pipelines, rows, sharding
from .backbones import check_controlnet_for_pipeline
from .errors import SkingenError
from .fileio import atomic_save_image, read_jsonl, remove_stale_temp_files, write_jsonl
from .layout import Layout, load_layout, split_atlas
from .models import SDXLComponents, load_or_init_controlnet, load_sdxl_components

# Sampler names -> diffusers scheduler classes (SDXL's DDPM samplers and the flow-matching ones; see pipelines).
SCHEDULERS = pipelines.ALL_SCHEDULERS
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

RESULTS_FILE = "results.jsonl"
IMAGES_DIR = "images"
GRIDS_DIR = "grids"
PACKAGES_DIR = "packages"

# Keys of a results record that must match for an existing image to count as this run's image.
_RESUME_KEYS = ("prompt", "negative_prompt", "seed", "conditioning_images", "height", "width", "settings")


# ---------------------------------------------------------------------------------------------------------------
# What to generate


@dataclass(frozen=True)
class GenerationRow:
    """One prompt with its control image(s) (one per ControlNet): a dataset row or one prompt/control pair."""

    row_id: str
    prompt: str
    control_images: tuple[str, ...]
    where: str  # "file:line" or "pair 3", for error messages
    seed: int | None = None  # the row's own seed; None: --seed + row index
    box: list | None = None  # 4-point quads in the pixels of box_size
    texts: list[str] | None = None
    box_size: tuple[int, int] | None = None  # (w, h) of the image the boxes were measured on
    reference_image: str | None = None  # the row's target image, when the dataset has one


@dataclass(frozen=True)
class ImageJob:
    """One image to generate: a row, a seed and the output size."""

    row: GenerationRow
    seed: int
    height: int
    width: int

    @property
    def output(self) -> str:
        """Path of the image, relative to the output folder."""
        return f"{IMAGES_DIR}/{file_stem(self.row.row_id)}_s{self.seed}.png"

    @property
    def package(self) -> str:
        return f"{PACKAGES_DIR}/{file_stem(self.row.row_id)}_s{self.seed}"


@dataclass(frozen=True)
class SamplingSettings:
    """Pipeline-call arguments shared by every image of a run."""

    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    negative_prompt: str | None = None
    controlnet_conditioning_scale: tuple[float, ...] = (1.0,)
    control_guidance_start: tuple[float, ...] = (0.0,)
    control_guidance_end: tuple[float, ...] = (1.0,)


def file_stem(row_id: str) -> str:
    """A row id as a file-name stem: ``images/0.png`` -> ``images_0``; any character unsafe in file names -> ``_``."""
    stem = posixpath.splitext(row_id.replace("\\", "/"))[0]
    return re.sub(r"[^\w.-]+", "_", stem).strip("._") or "row"


def pair_prompts_and_controls(
    prompts: Sequence[str], control_groups: Sequence[Sequence[str]]
) -> list[tuple[str, tuple[str, ...]]]:
    """Pair ``--prompt`` entries with ``--control_image`` entries as diffusers pairs validation prompts and images.

    ``control_groups`` holds one list per ControlNet (or one list shared by all). Each list, and the prompts,
    must have either one entry (used for every pair) or the same number N as the longest (paired in order).
    Returns ``(prompt, controls)`` pairs, ``controls`` one path per group.
    """
    if not prompts:
        raise SkingenError("--prompt: give at least one prompt (or use --dataset_dir)")
    if not control_groups or not all(control_groups):
        raise SkingenError("--control_image: give at least one control image for the prompts (or use --dataset_dir)")
    lengths = [len(prompts)] + [len(group) for group in control_groups]
    count = max(lengths)
    if any(n not in (1, count) for n in lengths):
        shown = ", ".join(
            [f"--prompt has {len(prompts)}"]
            + [f"--control_image group {i + 1} has {len(g)}" for i, g in enumerate(control_groups)]
        )
        raise SkingenError(
            f"cannot pair prompts with control images ({shown}); give one prompt for all control images, "
            "one control image for all prompts, or the same number of each (paired in order)"
        )

    def pick(entries: Sequence[str], index: int) -> str:
        return entries[0] if len(entries) == 1 else entries[index]

    return [(pick(prompts, i), tuple(pick(group, i) for group in control_groups)) for i in range(count)]


def rows_from_prompts(prompts: Sequence[str], control_groups: Sequence[Sequence[str]]) -> list[GenerationRow]:
    """Rows for prompt/control lists; row ids are the pair numbers ``0000``, ``0001``, ..."""
    rows = []
    for index, (prompt, controls) in enumerate(pair_prompts_and_controls(prompts, control_groups)):
        resolved = tuple(_existing_image(path, f"--control_image {path}") for path in controls)
        rows.append(
            GenerationRow(row_id=f"{index:04d}", prompt=prompt, control_images=resolved, where=f"pair {index + 1}")
        )
    return rows


def rows_from_dataset(
    dataset_dir: str | os.PathLike,
    split: str = "train",
    *,
    caption_column: str | None = None,
    conditioning_image_columns: Sequence[str] | None = None,
    image_column: str | None = None,
    max_samples: int | None = None,
) -> list[GenerationRow]:
    """Rows of one split of a dataset folder (``<split>.jsonl`` or ImageFolder ``metadata.jsonl``).

    Each row is checked by :func:`skingen.rows.check_row` as training checks it: a caption and conditioning
    image(s) are needed (one column per ControlNet, or one for all); the target image is optional (when present
    it names the row, as in training, and sizes its boxes). Rows may carry ``seed``, ``box`` and ``texts``
    (``texts`` default: ``writing "..."`` in the caption). Bad rows stop the run, every problem listed by file:line.
    """
    files = data.find_dataset_files(dataset_dir, split)
    control_keys = list(conditioning_image_columns or [None])
    scan = data.scan_folder(
        files,
        image_column=image_column,
        conditioning_image_column=control_keys[0],
        caption_column=caption_column,
        max_samples=max_samples,
        spec=rows.INFERENCE,
        extra_conditioning_keys=tuple(control_keys[1:]),
    )
    data.enforce_rows(
        scan,
        fix="fix or remove those rows (caption.py / render_glyphs.py fill captions and conditioning images), "
        "or choose other keys with --caption_column / --conditioning_image_column",
    )
    return [_generation_row(row) for row in scan.good]


def _generation_row(row: rows.Row) -> GenerationRow:
    return GenerationRow(
        row_id=row.row_id,
        prompt=row.text,
        control_images=tuple(os.path.abspath(ref.path) for ref in row.conditioning_images),
        where=row.where,
        seed=row.seed,
        box=row.box or None,
        texts=list(row.texts) if row.box else None,
        box_size=row.box_size if row.box else None,
        reference_image=os.path.abspath(row.image.path) if row.image is not None else None,
    )


def _existing_image(path: str | os.PathLike, label: str) -> str:
    """Absolute path of an image file; a missing or unreadable one is a SkingenError naming ``label``."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise SkingenError(f"{label}: control image not found (looked for {resolved}); check the path")
    _image_size(str(resolved), label)
    return str(resolved)


@lru_cache(maxsize=4096)
def _image_size(path: str, label: str | None = None) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise SkingenError(f"{label or path}: not a readable image ({err})") from None


@lru_cache(maxsize=32)
def load_control_image(path: str) -> Image.Image:
    """A control image as RGB (cached: a shared template is read once)."""
    try:
        with Image.open(path) as image:
            image.load()
            return data.to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise SkingenError(f"{path}: not a readable control image ({err})") from None


def plan_jobs(
    rows: Sequence[GenerationRow],
    *,
    num_images_per_prompt: int = 1,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    size_multiple: int = 8,
) -> list[ImageJob]:
    """Every image of a run, in row order.

    Seeds: row ``i`` gives images with seeds ``seed + i * num_images_per_prompt + k`` (k < num_images_per_prompt),
    so with one image per prompt row i uses ``seed + i`` and no two images of a run share noise; a row's own
    ``seed`` field replaces the first seed. Size: ``height``/``width`` when given, else the first control image's
    size rounded down to a multiple of ``size_multiple`` (8 for SDXL's VAE; 16 for SD3's patches and FLUX's packing).
    """
    if num_images_per_prompt < 1:
        raise SkingenError(f"--num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and (value < size_multiple or value % size_multiple):
            raise SkingenError(
                f"{name} {value}: must be a positive multiple of {size_multiple} "
                "(the model works on blocks of that many pixels: 8 for SDXL, 16 for SD3 and FLUX)"
            )
    jobs = []
    for index, row in enumerate(rows):
        control_w, control_h = _image_size(row.control_images[0])
        job_h = height if height is not None else max(size_multiple, control_h // size_multiple * size_multiple)
        job_w = width if width is not None else max(size_multiple, control_w // size_multiple * size_multiple)
        first = row.seed if row.seed is not None else seed + index * num_images_per_prompt
        jobs.extend(ImageJob(row=row, seed=first + k, height=job_h, width=job_w) for k in range(num_images_per_prompt))
    outputs: dict[str, ImageJob] = {}
    for job in jobs:
        other = outputs.setdefault(job.output, job)
        if other is not job:
            raise SkingenError(
                f"{job.row.where} and {other.row.where} would both write {job.output} (same file name and seed); "
                "give the rows distinct 'row_id' values or seeds"
            )
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# The pipeline


def scheduler_class(name: str):
    import diffusers

    if name not in SCHEDULERS:
        raise SkingenError(f"--scheduler {name!r}: unknown scheduler; choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name])


def make_scheduler(name: str, base_config: dict):
    """The named scheduler with the base pipeline's noise schedule (betas, timestep spacing) from ``base_config``."""
    return scheduler_class(name).from_config(base_config)


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
            check_controlnet_for_pipeline(path, local_base, flag="--controlnet")
        else:  # a hub id: the family from the ControlNet's own config
            pipelines.check_controlnet_family(family, path)
    if family.name == "sdxl":
        components = load_sdxl_components(
            pretrained_model_name_or_path, variant=variant, vae_model_name_or_path=vae_model_name_or_path
        )
        controlnets = [load_or_init_controlnet(components.unet, path) for path in controlnet_model_name_or_path]
        pipeline = assemble_pipeline(components, controlnets, load_scheduler(scheduler, pretrained_model_name_or_path))
    else:
        pipeline = load_flow_pipeline(
            family,
            pretrained_model_name_or_path,
            controlnet_model_name_or_path,
            vae_model_name_or_path=vae_model_name_or_path,
            variant=variant,
            scheduler=scheduler,
        )
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


def load_flow_pipeline(
    family: pipelines.Family,
    pretrained_model_name_or_path: str | os.PathLike,
    controlnet_model_name_or_path: Sequence[str | os.PathLike],
    *,
    vae_model_name_or_path: str | os.PathLike | None = None,
    variant: str | None = None,
    scheduler: str = "flow_euler",
):
    """An SD3 or FLUX ControlNet pipeline through diffusers' ``from_pretrained``, as the real weights load
    (``load_controlnet_pipeline`` has checked the ControlNets against the base)."""
    import diffusers

    base = str(Path(pretrained_model_name_or_path).expanduser())
    if not Path(base).exists():
        base = str(pretrained_model_name_or_path)  # a hub id
    controlnet_class = getattr(diffusers, family.controlnet_model)
    controlnets = [
        _load_part(f"{family.title} ControlNet", controlnet_class.from_pretrained, str(path))
        for path in controlnet_model_name_or_path
    ]
    extra = {}
    if vae_model_name_or_path is not None:
        extra["vae"] = _load_part("VAE", diffusers.AutoencoderKL.from_pretrained, str(vae_model_name_or_path))
    controlnet = (
        controlnets[0] if len(controlnets) == 1 else getattr(diffusers, family.multi_controlnet_model)(controlnets)
    )
    pipeline_class = getattr(diffusers, family.controlnet_pipeline)
    pipeline = _load_part(
        f"{family.title} pipeline",
        pipeline_class.from_pretrained,
        base,
        controlnet=controlnet,
        variant=variant,
        **extra,
    )
    pipeline.scheduler = pipelines.make_scheduler(family, scheduler, pipeline.scheduler.config)
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


def _load_part(what: str, loader, *args, **kwargs):
    """``loader(*args, **kwargs)``; a load failure becomes a SkingenError naming the part and the folder."""
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        where = next((str(a) for a in args if isinstance(a, (str, os.PathLike))), "")
        sub = kwargs.get("subfolder")
        where = f"{where}/{sub}" if sub else where
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SkingenError(
            f"{where}: could not load the {what} ({first}); expected a diffusers folder as "
            "`python scripts/make_tiny_pipeline.py --backbone sd3|flux --out DIR --controlnet` writes (the pipeline, "
            "and the ControlNet in DIR/controlnet). Without internet, pass local folders."
        ) from None


def assemble_pipeline(components: SDXLComponents, controlnets: Sequence, scheduler):
    """SDXL components + ControlNet(s) -> ``StableDiffusionXLControlNetPipeline`` (models stay where they are)."""
    from diffusers import StableDiffusionXLControlNetPipeline

    return StableDiffusionXLControlNetPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder_one,
        text_encoder_2=components.text_encoder_two,
        tokenizer=components.tokenizer_one,
        tokenizer_2=components.tokenizer_two,
        unet=components.unet,
        controlnet=controlnets[0] if len(controlnets) == 1 else list(controlnets),
        scheduler=scheduler,
        add_watermarker=False,  # the invisible watermark changes pixels; outputs are research data
    )


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
    # Control images go in as one (batch, 3, H, W) tensor in [0, 1] per ControlNet: the pipeline takes a batch of
    # PIL images for a single ControlNet only, and tensors give both cases the same preprocessing.
    processor = getattr(pipeline, "control_image_processor", None) or _unit_range_processor()
    # A ControlNet trained on several conditioning images takes them stacked on channels, in column order.
    groups = [
        torch.cat([
            processor.preprocess([load_control_image(_controls_for(job.row, inputs, k)[i]) for job in jobs],
                                 height=height, width=width)
            for i in range(inputs[k])
        ], dim=1)
        for k in range(count)
    ]
    scales = per_controlnet(settings.controlnet_conditioning_scale, count, "--controlnet_conditioning_scale")
    starts = per_controlnet(settings.control_guidance_start, count, "--control_guidance_start")
    ends = per_controlnet(settings.control_guidance_end, count, "--control_guidance_end")
    result = pipeline(
        prompt=[job.row.prompt for job in jobs],
        # None: the family's default (SDXL's zeroed negative embedding, SD3's empty prompt); a string is encoded.
        **({} if settings.negative_prompt is None else {"negative_prompt": [settings.negative_prompt] * len(jobs)}),
        **{family.control_image_argument: groups[0] if count == 1 else groups},
        height=height,
        width=width,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        controlnet_conditioning_scale=scales[0] if count == 1 else scales,
        control_guidance_start=starts[0] if count == 1 else starts,
        control_guidance_end=ends[0] if count == 1 else ends,
        generator=[torch.Generator(device="cpu").manual_seed(job.seed) for job in jobs],
        output_type="pil",  # latents stay on the device until the final decode
    )
    return result.images


def _unit_range_processor():
    """Control images as [0, 1] tensors, for pipelines (SD3, FLUX) that normalise them before their VAE."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(do_normalize=False, do_convert_rgb=True)


def _controls_for(row: GenerationRow, inputs: Sequence[int], index: int) -> tuple[str, ...]:
    """The row's control images for ControlNet ``index`` (``inputs``: images per ControlNet, in order); a single
    control image serves every single-input ControlNet."""
    if len(row.control_images) == 1 and set(inputs) == {1}:
        return row.control_images
    start = sum(inputs[:index])
    return row.control_images[start:start + inputs[index]]


def check_control_counts(rows: Sequence[GenerationRow], count: int | Sequence[int]) -> None:
    """Every row has the control images the ControlNets take: ``count`` ControlNets of one image each, or a list
    of images per ControlNet (several for one trained on several conditioning columns)."""
    inputs = [1] * count if isinstance(count, int) else list(count)
    needed = sum(inputs)
    for row in rows:
        if set(inputs) == {1} and len(row.control_images) not in (1, needed):
            raise SkingenError(
                f"{row.where}: {len(row.control_images)} control images for {needed} ControlNet(s); "
                "give one control image (shared) or one per --controlnet"
            )
        if set(inputs) != {1} and len(row.control_images) != needed:
            raise SkingenError(
                f"{row.where}: {len(row.control_images)} control images, but the ControlNet(s) take {needed} "
                f"({' + '.join(map(str, inputs))}: one per conditioning column they were trained on); name them with "
                "--conditioning_image_column (or repeat --control_image) in training order"
            )


# ---------------------------------------------------------------------------------------------------------------
# Outputs: results.jsonl, grids, skin packages


def settings_record(
    *,
    pretrained_model_name_or_path: str | os.PathLike,
    controlnet_model_name_or_path: Sequence[str | os.PathLike],
    vae_model_name_or_path: str | os.PathLike | None,
    variant: str | None,
    scheduler: str,
    dtype: str,
    sampling: SamplingSettings,
    lora: str | os.PathLike | None = None,
) -> dict:
    """What decides the pixels of a run (not how fast it runs), as stored with every results record."""
    count = len(controlnet_model_name_or_path)
    return {
        **({} if lora is None else {"lora": _model_id(lora)}),
        "pretrained_model_name_or_path": _model_id(pretrained_model_name_or_path),
        "controlnet": [_model_id(path) for path in controlnet_model_name_or_path],
        "vae": None if vae_model_name_or_path is None else _model_id(vae_model_name_or_path),
        "variant": variant,
        "scheduler": scheduler,
        "dtype": dtype,
        "num_inference_steps": sampling.num_inference_steps,
        "guidance_scale": float(sampling.guidance_scale),
        "negative_prompt": sampling.negative_prompt,
        "controlnet_conditioning_scale": [
            float(v)
            for v in per_controlnet(sampling.controlnet_conditioning_scale, count, "--controlnet_conditioning_scale")
        ],
        "control_guidance_start": [
            float(v) for v in per_controlnet(sampling.control_guidance_start, count, "--control_guidance_start")
        ],
        "control_guidance_end": [
            float(v) for v in per_controlnet(sampling.control_guidance_end, count, "--control_guidance_end")
        ],
    }


def _model_id(name_or_path: str | os.PathLike) -> str:
    """A local model folder as an absolute path (so reruns from another folder match); a hub id as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def job_record(job: ImageJob, settings_record: dict) -> dict:
    """The ``results.jsonl`` line of one image. ``output`` is relative to the output folder; control paths are absolute.

    ``box`` is given in the generated image's pixels (scaled from the row's image), with ``box_size`` = its (w, h).
    """
    row = job.row
    record = {
        "row_id": row.row_id,
        "prompt": row.prompt,
        "negative_prompt": settings_record.get("negative_prompt"),
        "seed": job.seed,
        "conditioning_image": row.control_images[0],
        "conditioning_images": list(row.control_images),
        "output": job.output,
        "grid": f"{GRIDS_DIR}/{file_stem(row.row_id)}.png",
        "height": job.height,
        "width": job.width,
        "settings": settings_record,
    }
    if row.reference_image is not None:
        record["reference_image"] = row.reference_image
    if row.box:
        src_w, src_h = row.box_size
        sx, sy = job.width / src_w, job.height / src_h
        record["box"] = [[[round(x * sx, 2), round(y * sy, 2)] for x, y in quad] for quad in row.box]
        record["box_size"] = [job.width, job.height]
        record["texts"] = list(row.texts or [])
    return record


class ResultsLog:
    """``results.jsonl`` of an output folder: one record per generated image, keyed by its ``output`` path."""

    def __init__(self, output_dir: str | os.PathLike, *, overwrite: bool = False):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / RESULTS_FILE
        self.overwrite = overwrite
        self.records: dict[str, dict] = {}
        self.lines: dict[str, int] = {}
        if self.path.is_file() and not overwrite:
            for lineno, record in read_jsonl(self.path):
                if not isinstance(record.get("output"), str):
                    raise SkingenError(f"{self.path}:{lineno}: record has no 'output' path; fix or delete the line")
                self.records[record["output"]] = record
                self.lines[record["output"]] = lineno

    def pending(self, jobs: Sequence[ImageJob], settings_record: dict) -> list[ImageJob]:
        """Jobs still to generate: not listed yet, or listed with a missing image file.

        A listed image made from other inputs (prompt, seed, control, size or settings) is an error, so earlier
        results are never silently replaced or mixed with new ones.
        """
        todo = []
        for job in jobs:
            old = self.records.get(job.output)
            if old is None or not (self.output_dir / job.output).is_file():
                todo.append(job)
                continue
            difference = _first_difference(old, job_record(job, settings_record))
            if difference is not None:
                key, was, now = difference
                raise SkingenError(
                    f"{self.path}:{self.lines[job.output]}: {job.output} was made with {key} {_short(was)}, "
                    f"this run asks for {_short(now)}; pass --overwrite to regenerate, or choose another --output_dir"
                )
        return todo

    def remove_leftovers(self) -> None:
        """Temp files of a killed run (images, grids, results.jsonl): by the main process, before any image."""
        remove_stale_temp_files(self.output_dir, recursive=True)

    def add(self, record: dict) -> None:
        self.records[record["output"]] = record

    def save(self) -> None:
        write_jsonl(self.path, self.records.values())


def _first_difference(old: dict, new: dict) -> tuple[str, Any, Any] | None:
    """The first input that differs between an existing record and this run's record of the same image."""
    for key in _RESUME_KEYS:
        was, now = old.get(key), new.get(key)
        if key == "settings" and isinstance(was, dict) and isinstance(now, dict):
            for name in dict.fromkeys([*now, *was]):
                if was.get(name) != now.get(name):
                    return f"--{name}", was.get(name), now.get(name)
        elif was != now:
            return key, was, now
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def make_grid(controls: Sequence[Image.Image], images: Sequence[Image.Image]) -> Image.Image:
    """One row: the control image(s), then the generated images, all scaled to the first image's height."""
    height = images[0].height
    tiles = [tile.convert("RGB") for tile in [*controls, *images]]
    tiles = [
        tile if tile.height == height else tile.resize((max(1, round(tile.width * height / tile.height)), height))
        for tile in tiles
    ]
    grid = Image.new("RGB", (sum(tile.width for tile in tiles), height), (255, 255, 255))
    x = 0
    for tile in tiles:
        grid.paste(tile, (x, 0))
        x += tile.width
    return grid


@dataclass
class RunSummary:
    generated: int = 0
    skipped: int = 0
    grids: int = 0
    packages: int = 0


def generate_all(
    get_pipeline: Callable[[], Any],
    jobs: Sequence[ImageJob],
    settings: SamplingSettings,
    settings_record: dict,
    results: ResultsLog,
    *,
    batch_size: int = 4,
    split_layout: str | os.PathLike | None = None,
) -> RunSummary:
    """Generate every pending job in batches of same-size images, the rows split over the launched processes
    (skingen.sharding); after each batch save the images, keep their records in a part file and finish the rows
    whose images are all there (grid, and skin packages with ``split_layout``). The main process merges the parts
    into ``results.jsonl`` at the end (and on Ctrl-C): the records already there in their order, then the new ones
    in job order, whatever the number of processes.

    ``get_pipeline()`` (e.g. loading the models) is called once, and only when something is left to generate.
    """

    if batch_size < 1:
        raise SkingenError(f"--batch_size must be at least 1, got {batch_size}")
    shard = sharding.shard_for(results.output_dir, "inference", settings_record)
    shard.group.on_main(lambda: (results.remove_leftovers(), shard.parts.prepare(overwrite=results.overwrite)))
    listed = dict(results.records)  # results.jsonl as it was: the merge keeps its order
    for entry in shard.parts.read().values():
        results.add(entry.fields)
    todo = results.pending(jobs, settings_record)
    summary = RunSummary(skipped=len(jobs) - len(todo))
    layouts = _split_layouts(split_layout, jobs) if split_layout is not None else {}
    finisher = _RowFinisher(jobs, results, layouts, summary)
    row_position = {row_id: i for i, row_id in enumerate(finisher.row_ids())}
    block = max(1, batch_size // max((len(row_jobs) for row_jobs in finisher.jobs_of_row.values()), default=1))
    job_index = {job.output: i for i, job in enumerate(jobs)}

    # Stable sort by size: a batch never mixes sizes, and same-size rows keep their order.
    batches: list[list[tuple[int, ImageJob]]] = []
    mine = [job for job in todo if shard.owns(row_position[job.row.row_id], block)]
    for job in sorted(mine, key=lambda job: (job.height, job.width)):
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0][1].height, last[0][1].width) == (job.height, job.width):
            last.append((job_index[job.output], job))
        else:
            batches.append([(job_index[job.output], job)])

    pipeline = None

    def generate(batch: list[ImageJob]) -> list[sharding.Entry]:
        nonlocal pipeline
        if pipeline is None:
            pipeline = get_pipeline()
        images = generate_batch(pipeline, batch, settings)
        for job, image in zip(batch, images):
            atomic_save_image(image, results.output_dir / job.output)
            results.add(job_record(job, settings_record))
            finisher.fresh.add(job.output)
        summary.generated += len(batch)
        finisher.finish({job.row.row_id for job in batch})
        return [sharding.Entry(job.output, results.records[job.output]) for job in batch]

    def merge(entries: dict[str, sharding.Entry]) -> None:
        merged = dict(listed)
        for job in jobs:
            if job.output in entries:
                merged[job.output] = entries[job.output].fields
        for job in jobs if layouts else []:
            if job.output in merged and (results.output_dir / job.package).is_dir():
                merged[job.output]["package"] = job.package
        results.records = merged
        results.save()

    try:
        shard.run([], generate, batch_size=batch_size, desc="generating", batches=batches)
    except KeyboardInterrupt:
        shard.merge_on_interrupt(merge)
        raise
    # Rows finished by an earlier run may still lack their grid or packages (e.g. --split_elements added now).
    finisher.finish([row_id for row_id, position in row_position.items() if shard.owns(position, block)])
    shard.finish(merge)
    totals = shard.group.all_gather((summary.generated, summary.grids, summary.packages))
    summary.generated, summary.grids, summary.packages = (sum(values) for values in zip(*totals))
    return summary


def _split_layouts(split_layout: str | os.PathLike, jobs: Sequence[ImageJob]) -> dict[tuple[int, int], Layout]:
    """The layout to cut each output size with, checked before anything is generated.

    An output size the spec has no variant for (e.g. 128 px from a small model) is cut with the
    spec's first variant after resizing, so the packages always have the layout's native sizes.
    """
    layouts = {}
    for width, height in sorted({(job.width, job.height) for job in jobs}):
        layout = load_layout(split_layout)
        if width in layout.resolutions:
            layout = load_layout(split_layout, resolution=width)
        if layout.width * height != layout.height * width:
            raise SkingenError(
                f"--split_elements {split_layout}: layout '{layout.name}' is {layout.width}x{layout.height}, "
                f"but images are generated at {width}x{height} (another aspect ratio); "
                f"set --height and --width in the proportion {layout.width}:{layout.height}"
            )
        layouts[(width, height)] = layout
    return layouts


class _RowFinisher:
    """Writes a row's grid, and its images' skin packages, once all of the row's images exist."""

    def __init__(self, jobs: Sequence[ImageJob], results: ResultsLog, layouts: dict, summary: RunSummary):
        self.results = results
        self.layouts = layouts
        self.summary = summary
        self.fresh: set[str] = set()  # outputs generated by this run
        self.finished: set[str] = set()  # rows whose grid and packages this run has written
        self.jobs_of_row: dict[str, list[ImageJob]] = {}
        for job in jobs:
            self.jobs_of_row.setdefault(job.row.row_id, []).append(job)

    def row_ids(self) -> list[str]:
        return list(self.jobs_of_row)

    def finish(self, row_ids) -> None:
        output_dir = self.results.output_dir
        for row_id in row_ids:
            row_jobs = self.jobs_of_row[row_id]
            if row_id in self.finished or not all((output_dir / job.output).is_file() for job in row_jobs):
                continue
            self.finished.add(row_id)
            images = {}
            grid_path = output_dir / GRIDS_DIR / f"{file_stem(row_id)}.png"
            if any(job.output in self.fresh for job in row_jobs) or not grid_path.is_file():
                images = {job.output: _open_output(output_dir / job.output) for job in row_jobs}
                controls = [load_control_image(path) for path in row_jobs[0].row.control_images]
                atomic_save_image(make_grid(controls, list(images.values())), grid_path)
                self.summary.grids += 1
            for job in row_jobs if self.layouts else []:
                package_dir = output_dir / job.package
                if job.output in self.fresh or not package_dir.is_dir():
                    image = images.get(job.output) or _open_output(output_dir / job.output)
                    layout = self.layouts[(job.width, job.height)]
                    if image.size != layout.size:
                        image = image.resize(layout.size, Image.Resampling.LANCZOS)
                    split_atlas(image, layout, package_dir)
                    self.summary.packages += 1


def _open_output(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
