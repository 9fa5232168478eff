#!/usr/bin/env python3
"""Train a Z-Image ControlNet on a skin dataset (the flags of train_controlnet_flux.py where they apply).

    accelerate launch train_controlnet_zimage.py --pretrained_model_name_or_path ZIMAGE_DIR \
        --train_data_dir DATASET_DIR --output_dir OUT --resolution 1024 --mixed_precision bf16 \
        --control_layers_places 0,5,10,15,20,25 --gradient_checkpointing --use_8bit_adam

The same loop as the other trainers (cached text embeddings and latents, exact resume, N processes = 1,
non-finite guard, EMA, validation grids with ZImageControlNetPipeline) with the Z-Image backbone
(skingen/backbones/zimage.py). Writes OUT/diffusion_pytorch_model.safetensors + config.json
(ZImageControlNetModel.from_pretrained(OUT)). The OCR text loss is on with --text_loss_weight W, the edge loss with
--edge_loss_weight W; --base_quantization int8|nf4|fp8 holds the frozen transformer quantized (CUDA).
Presets: configs/train/zimage_glyph_*.yaml; docs/backbones.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from skingen.errors import run_cli
from skingen.train.loop import build_arg_parser, parse_training_args, train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_training_args(build_arg_parser(backbone="zimage"), argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = train(args)
    if result.is_main_process:
        print(f"trained {result.global_step} steps; ControlNet weights in {result.output_dir}")


if __name__ == "__main__":
    run_cli(main)
