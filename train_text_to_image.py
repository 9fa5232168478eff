#!/usr/bin/env python3
"""Train a base model's denoiser itself (the SDXL UNet, or the SD3/FLUX/Z-Image/Qwen-Image transformer) on a skin
dataset with the text-to-image diffusion loss, no ControlNet (diffusers' train_text_to_image_sdxl.py; kohya's
sdxl_train.py).

    accelerate launch train_text_to_image.py --backbone sdxl --pretrained_model_name_or_path SDXL_DIR \
        --train_data_dir DATASET_DIR --output_dir OUT --resolution 1024 --proportion_empty_prompts 0.1 \
        --learning_rate 1e-5 --use_ema --mixed_precision bf16

The same loop as the ControlNet trainers (cached text embeddings and latents, exact resume, N processes = 1,
non-finite guard, EMA, fixed-timestep validation losses). Writes OUT/unet (or OUT/transformer) in diffusers' layout,
ready to replace the base pipeline's folder, the EMA weights in OUT/ema/unet with --use_ema, and checkpoint-N folders.
Conditioning images in the rows are not read. See docs/training.md ("Training the base model itself").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from skingen.errors import run_cli
from skingen.train.denoiser_training import parse_denoiser_args, trained_subfolder
from skingen.train.loop import train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_denoiser_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = train(args)
    if result.is_main_process:
        print(f"trained {result.global_step} steps; {trained_subfolder(args)} weights in "
              f"{result.output_dir / trained_subfolder(args)}")


if __name__ == "__main__":
    run_cli(main)
