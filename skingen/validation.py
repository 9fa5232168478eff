"""Validation during training (sample grids of the ControlNet being trained, logged to the trackers) and the
model card written at the end."""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import pipelines
from .caching import TextEmbeddingCache
from .data import load_skin_dataset, open_rgb
from .errors import SkingenError
from .fileio import atomic_save_image, atomic_write_text
from .training_data import resize_and_center_crop


@dataclass
class ValidationPair:
    prompt: str
    control: Image.Image  # conditioning image at training size


def load_validation_pairs(args: argparse.Namespace) -> list[ValidationPair]:
    """Prompt/conditioning pairs from the flags (diffusers' pairing rules) or from a split of the dataset."""
    if args.validation_prompt is not None:
        prompts, images = list(args.validation_prompt), list(args.validation_image)
        if len(images) == 1:
            images = images * len(prompts)
        elif len(prompts) == 1:
            prompts = prompts * len(images)
        return [
            ValidationPair(prompt, resize_and_center_crop(open_rgb(path, "--validation_image"), args.resolution)[0])
            for prompt, path in zip(prompts, images)
        ]
    if args.validation_split is not None:
        rows = load_skin_dataset(
            args.train_data_dir, split=args.validation_split, image_column=args.image_column,
            conditioning_image_column=args.conditioning_image_column, caption_column=args.caption_column,
            on_bad_sample=args.on_bad_sample, max_samples=args.validation_rows,
        ).select_columns(["text", "conditioning_image"])
        return [ValidationPair(row["text"], resize_and_center_crop(row["conditioning_image"], args.resolution)[0]) for row in rows]
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
    guidance_scale = getattr(args, "guidance_scale", None) or family.default_guidance_scale
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
                    **prompt, **negative, **{family.control_image_argument: pair.control},
                    height=args.resolution, width=args.resolution, guidance_scale=guidance_scale,
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
