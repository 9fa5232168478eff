#!/usr/bin/env python3
"""Reward fine-tuning of a trained ControlNet with GRPO (Flow-GRPO) for the flow-matching families (SD3/SD3.5,
FLUX.1, Z-Image, Qwen-Image): images sampled with an SDE sampler, scored with evaluate.py's metrics, advantages within each control's
group, clipped policy ratio per denoising step and a KL penalty to the starting ControlNet.

    accelerate launch train_controlnet_grpo.py --pretrained_model_name_or_path SD35_DIR \
        --controlnet_model_name_or_path TRAINED_CONTROLNET --train_data_dir DATASET_DIR --output_dir OUT \
        --reward edge_f1=1,ocr_ned=1 --num_image_per_prompt 8 --train_sampling_steps 10 \
        --validation_split validation --validation_inference_steps 28 --resolution 512

The family comes from the base folder's model_index.json (--backbone for a hub id); --denoiser_lora_rank also trains
a transformer LoRA. Writes the ControlNet as the supervised trainers do (OUT/diffusion_pytorch_model.safetensors),
OUT/grpo_log.json (rewards per step, held-out rewards) and TensorBoard logs. docs/grpo.md: when to use it, its
cost and what it was measured to do.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from skingen.errors import run_cli
from skingen.train.grpo.options import add_grpo_arguments, family_from_argv, validate_grpo_arguments
from skingen.train.grpo.trainer import train_grpo
from skingen.train.loop import build_arg_parser, parse_training_args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    family = family_from_argv(argv)
    parser = build_arg_parser("Fine-tune a ControlNet with GRPO on rewards of sampled images.", backbone=family)
    add_grpo_arguments(parser, family)
    args = parse_training_args(parser, argv)
    validate_grpo_arguments(args)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = train_grpo(args)
    if result.is_main_process:
        print(f"GRPO: {result.global_step} steps; ControlNet weights in {result.output_dir}")


if __name__ == "__main__":
    run_cli(main)
