"""Build a tiny random-weight SDXL pipeline (+ optional ControlNet) in diffusers format, offline.

    python scripts/make_tiny_sdxl.py --out models/tiny-sdxl --controlnet
    python scripts/make_tiny_sdxl.py --out models/small-sdxl --preset small --controlnet

The folder loads like stable-diffusion-xl-base-1.0 (`--pretrained_model_name_or_path models/tiny-sdxl`),
so every stage can be tried end to end on a CPU without downloading weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skingen.config import parse_args_with_config  # noqa: E402
from skingen.errors import run_cli  # noqa: E402
from skingen.testing.tiny_sdxl import PRESETS, build_tiny_sdxl, count_parameters  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", required=True, help="folder to write the pipeline to (created; a previous tiny SDXL there is replaced)"
    )
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(PRESETS),
        help="tiny: unit tests (64-128 px); small: benchmarks (128-256 px)",
    )
    parser.add_argument("--controlnet", action="store_true", help="also write a matching ControlNet to OUT/controlnet")
    parser.add_argument("--seed", type=int, default=0, help="weights are identical for the same seed")
    return parse_args_with_config(parser, argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = build_tiny_sdxl(args.out, preset=args.preset, seed=args.seed, controlnet=args.controlnet)

    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = [
        ("unet", UNet2DConditionModel),
        ("vae", AutoencoderKL),
        ("text_encoder", CLIPTextModel),
        ("text_encoder_2", CLIPTextModelWithProjection),
    ]
    if args.controlnet:
        parts.append(("controlnet", ControlNetModel))
    print(f"wrote a {args.preset} SDXL pipeline (seed {args.seed}) to {out}")
    for name, cls in parts:
        print(f"  {name + '/':<16} {count_parameters(cls.from_pretrained(out / name)):>12,} parameters")
    print(f"use it with --pretrained_model_name_or_path {out}")


if __name__ == "__main__":
    run_cli(main)
