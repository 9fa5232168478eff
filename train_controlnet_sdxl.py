#!/usr/bin/env python3
"""Train an SDXL ControlNet on a skin dataset (flags compatible with diffusers' train_controlnet_sdxl.py).

    accelerate launch train_controlnet_sdxl.py --pretrained_model_name_or_path SDXL_DIR \
        --train_data_dir DATASET_DIR --output_dir OUT --resolution 512 --mixed_precision bf16

Writes OUT/diffusion_pytorch_model.safetensors + config.json (ControlNetModel.from_pretrained(OUT)), a model
card, checkpoint-N folders, validation grids under OUT/validation/ and TensorBoard logs under OUT/logs/.
Any flag can also come from a YAML file: --config configs/train/<preset>.yaml (the command line wins).
With a Canny control, --edge_loss_weight 0.3 adds ControlNet++'s edge consistency loss (skingen/train/edge_loss.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from skingen.errors import run_cli
from skingen.train.loop import build_arg_parser, parse_training_args, train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_training_args(build_arg_parser(), argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = train(args)
    if result.is_main_process:
        print(f"trained {result.global_step} steps; ControlNet weights in {result.output_dir}")


if __name__ == "__main__":
    run_cli(main)
