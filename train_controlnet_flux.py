#!/usr/bin/env python3
"""Train a FLUX.1 ControlNet on a skin dataset (flags compatible with diffusers' examples/controlnet/train_controlnet_flux.py).

    accelerate launch train_controlnet_flux.py --pretrained_model_name_or_path FLUX_DIR \
        --train_data_dir DATASET_DIR --output_dir OUT --resolution 1024 --mixed_precision bf16 \
        --num_double_layers 4 --num_single_layers 0 --guidance_scale 3.5

The same loop as train_controlnet_sdxl.py (cached text embeddings and latents, exact resume, N processes = 1,
non-finite guard, validation grids with FluxControlNetPipeline) with the FLUX.1 backbone
(skingen/backbones/flux.py). Writes OUT/diffusion_pytorch_model.safetensors + config.json
(FluxControlNetModel.from_pretrained(OUT)). The OCR text loss of train_controlnet_sdxl_ctc.py is available with
--text_loss_weight W (and the other --text_loss_* flags); without it there is none.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from skingen.errors import run_cli
from skingen.train.loop import build_arg_parser, parse_training_args, train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_training_args(build_arg_parser(backbone="flux"), argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = train(args)
    if result.is_main_process:
        print(f"trained {result.global_step} steps; ControlNet weights in {result.output_dir}")


if __name__ == "__main__":
    run_cli(main)
