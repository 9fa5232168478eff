"""Validation during training (sample grids of the ControlNet being trained, logged to the trackers) and the
model card written at the end."""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..backbones import pipelines
from ..data.caches import TextEmbeddingCache
from ..data.dataset import open_rgb
from ..errors import SkingenError
from ..fileio import atomic_save_image, atomic_write_text
from .batches import load_training_rows, resize_and_center_crop
from .conditioning import stack_conditions
from .options import interpolation_filter


@dataclass
class ValidationPair:
    prompt: str
    control: Image.Image  # conditioning image at training size (the first one, shown in the grid)
    extra_controls: list[Image.Image] = field(default_factory=list)  # further --conditioning_image_column images

    def pipeline_image(self):
        """What the pipeline takes as the control: the image, or all images stacked on channels."""
        if not self.extra_controls:
            return self.control
        return stack_conditions([torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
                                 for image in (self.control, *self.extra_controls)])


def load_validation_pairs(args: argparse.Namespace) -> list[ValidationPair]:
    """Prompt/conditioning pairs from the flags (diffusers' pairing rules) or from a split of the dataset, resized
    with ``--image_interpolation_mode`` as diffusers resizes its validation images."""
    resample = interpolation_filter(getattr(args, "image_interpolation_mode", "lanczos"))
    if args.validation_prompt is not None:
        prompts, images = list(args.validation_prompt), list(args.validation_image)
        if len(images) == 1:
            images = images * len(prompts)
        elif len(prompts) == 1:
            prompts = prompts * len(images)
        # With several --conditioning_image_column, each --validation_image lists one image per column: a.png,b.png
        controls = [[resize_and_center_crop(open_rgb(part, "--validation_image"), args.resolution, resample)[0]
                     for part in path.split(",")] for path in images]
        return [ValidationPair(prompt, first, rest) for prompt, (first, *rest) in zip(prompts, controls)]
    if args.validation_split is not None:
        rows = load_training_rows(args, split=args.validation_split, max_samples=args.validation_rows)
        pairs = []
        for index, row in enumerate(rows):
            first, *rest = (resize_and_center_crop(image, args.resolution, resample)[0]
                            for image in rows.conditioning_images(index))
            pairs.append(ValidationPair(row.text, first, rest))
        return pairs
    return []


@torch.no_grad()
def log_validation(pairs: Sequence[ValidationPair], *, args, accelerator, backbone, controlnet,
                   text_cache: TextEmbeddingCache, weight_dtype: torch.dtype, step: int, seed: int) -> Path:
    """Sample ``--num_validation_images`` per pair; save ``OUTPUT_DIR/validation/step-N.png`` and log to trackers.

    The pipeline is the backbone's ControlNet pipeline (SDXL, SD3, FLUX) with the family's default sampler (UniPC
    for SDXL, flow-matching Euler for SD3/FLUX) and guidance (FLUX: ``--guidance_scale`` when the trainer has it).
    Rows of the grid: the conditioning image, then the samples. Prompts come from the embedding cache, so no
    text encoder is needed; image ``k`` of every validation uses seed ``seed + k``, so steps compare directly.
    """
    from diffusers.utils import make_image_grid

    family = pipelines.family_named(backbone.family)
    device = accelerator.device
    vae = backbone.vae
    vae_device = vae.device
    vae.to(device)
    controlnet = accelerator.unwrap_model(controlnet)
    if weight_dtype != torch.float32:
        # A plain copy in the UNet's dtype: the prepared model returns fp32 residuals (accelerate's mixed-precision
        # wrapper), which would upcast the UNet's activations against its half-precision weights.
        trained = controlnet
        controlnet = type(trained).from_config(trained.config)
        controlnet.load_state_dict(trained.state_dict())
        controlnet.to(device, dtype=weight_dtype)
    # A fresh sampler: sampling moves a scheduler's timesteps, and the training one must keep its own.
    scheduler = pipelines.make_scheduler(family, family.default_scheduler, backbone.noise_scheduler.config)
    pipeline = backbone.validation_pipeline(controlnet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    guidance_scale = getattr(args, "guidance_scale", None)
    guidance_scale = family.default_guidance_scale if guidance_scale is None else guidance_scale
    empty_prompt = _cached_empty_prompt(text_cache) if family.needs_negative_embeds else None
    rows = []
    for pair in pairs:
        prompt = backbone.prompt_kwargs(text_cache.load(pair.prompt), device, weight_dtype)
        negative = {}
        if family.needs_negative_embeds:
            # The empty prompt's embeddings when cached (--proportion_empty_prompts > 0), else zeros, as SDXL's
            # pipeline does for an empty negative prompt.
            source = (backbone.prompt_kwargs(empty_prompt, device, weight_dtype) if empty_prompt is not None
                      else {key: torch.zeros_like(value) for key, value in prompt.items()})
            negative = {f"negative_{key}": value for key, value in source.items()}
        images = []
        for index in range(args.num_validation_images):
            # SD3's pipeline draws the control latent from the global RNG: seed it per image, and keep the
            # training's RNG state as it was.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
                torch.manual_seed(seed + index)
                images.append(pipeline(
                    **prompt, **negative, **{family.control_image_argument: pair.pipeline_image()},
                    height=args.resolution, width=args.resolution, **{family.guidance_argument: guidance_scale},
                    num_inference_steps=args.validation_inference_steps,
                    generator=torch.Generator().manual_seed(seed + index),
                ).images[0])
        rows.append([pair.control, *images])
    grid = make_image_grid([image for row in rows for image in row], rows=len(rows), cols=len(rows[0]))
    path = atomic_save_image(grid, Path(args.output_dir) / "validation" / f"step-{step}.png")

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for i, (pair, row) in enumerate(zip(pairs, rows)):
                tracker.writer.add_images(f"validation/{i}: {pair.prompt[:80]}",
                                          np.stack([np.asarray(image) for image in row]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [
                wandb.Image(image, caption="conditioning" if j == 0 else pair.prompt)
                for pair, row in zip(pairs, rows) for j, image in enumerate(row)
            ]}, step=step)
    vae.to(vae_device)
    del pipeline, controlnet
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def _cached_empty_prompt(text_cache: TextEmbeddingCache) -> dict[str, torch.Tensor] | None:
    try:
        return text_cache.load("")
    except SkingenError:
        return None


def write_model_card(args: argparse.Namespace, *, global_step: int, num_rows: int, num_processes: int,
                     mixed_precision: str, grid: Path | None) -> Path:
    """``OUTPUT_DIR/README.md``: base model, dataset, key settings, where the samples are, how to load.

    The family (SDXL, SD3, FLUX) is the one of the ControlNet saved in ``OUTPUT_DIR`` (its config's class)."""
    output_dir = Path(args.output_dir)
    base = args.pretrained_model_name_or_path
    saved_class = pipelines.controlnet_class_name(output_dir)
    family = next((f for f in pipelines.FAMILIES.values() if f.controlnet_model == saved_class), pipelines.FAMILIES["sdxl"])
    start = (f"fine-tuned from `{args.controlnet_model_name_or_path}`" if args.controlnet_model_name_or_path
             else f"initialised from the base model's {'UNet' if family.denoiser == 'unet' else 'transformer'}")
    settings = {
        "resolution": args.resolution,
        "batch size per process x processes x accumulation": f"{args.train_batch_size} x {num_processes} x "
                                                             f"{args.gradient_accumulation_steps}",
        "learning rate / scheduler": f"{args.learning_rate} / {args.lr_scheduler} (warmup {args.lr_warmup_steps})",
        "steps": global_step,
        "mixed precision": mixed_precision,
        "empty-prompt proportion": args.proportion_empty_prompts,
        "seed": args.seed,
    }
    table = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    tags = "\n".join(f"- {tag}" for tag in family.tags)
    samples = (f"![validation samples]({grid.relative_to(output_dir).as_posix()})\n\n"
               "Each row: the conditioning image, then generated samples.") if grid else "No validation was run."
    card = f"""---
base_model: {base}
library_name: diffusers
license: {family.license}
tags:
{tags}
- controlnet
- skingen
---

# ControlNet for keyboard skins

A ControlNet for the {family.title} model `{base}`, {start}, trained by skingen's `train_controlnet_{family.name}.py` on
`{args.dataset_name or args.train_data_dir}` ({num_rows} rows).

| setting | value |
|---|---|
{table}

## Samples

{samples}

## Use

```python
from diffusers import {family.controlnet_model}, {family.controlnet_pipeline}

controlnet = {family.controlnet_model}.from_pretrained("{args.hub_model_id or output_dir}")
pipe = {family.controlnet_pipeline}.from_pretrained("{base}", controlnet=controlnet)
```
"""
    return atomic_write_text(output_dir / "README.md", card)
