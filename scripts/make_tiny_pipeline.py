"""Build a tiny random-weight SDXL, SD3 or FLUX pipeline (+ optional ControlNet) in diffusers format, offline.

    python scripts/make_tiny_pipeline.py --backbone sd3 --out models/tiny-sd3 --controlnet
    python scripts/make_tiny_pipeline.py --backbone flux --out models/tiny-flux --controlnet
    python scripts/make_tiny_pipeline.py --backbone sdxl --out models/tiny-sdxl --controlnet

Each folder loads like the real model (stable-diffusion-xl-base-1.0, stable-diffusion-3.5-medium, FLUX.1-dev):
`--pretrained_model_name_or_path models/tiny-sd3`, `StableDiffusion3Pipeline.from_pretrained(...)`, and the
ControlNet in OUT/controlnet with SD3ControlNetModel / FluxControlNetModel / ControlNetModel, so every stage can
be tried end to end on a CPU without downloading weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skingen.backbones import backbone_class  # noqa: E402
from skingen.config import parse_args_with_config  # noqa: E402
from skingen.errors import run_cli  # noqa: E402
from skingen.testing.tiny_models import BACKBONES, build_tiny_pipeline  # noqa: E402
from skingen.testing.tiny_sdxl import PRESETS, count_parameters  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, choices=BACKBONES, help="model family to build")
    parser.add_argument(
        "--out",
        required=True,
        help="folder to write the pipeline to (created; a previous tiny pipeline there is replaced)",
    )
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(PRESETS),
        help="SDXL sizes: tiny for unit tests (64-128 px), small for benchmarks (128-256 px); SD3/FLUX: tiny only",
    )
    parser.add_argument("--controlnet", action="store_true", help="also write a matching ControlNet to OUT/controlnet")
    parser.add_argument("--seed", type=int, default=0, help="weights are identical for the same seed")
    return parse_args_with_config(parser, argv)


def main(argv: Sequence[str] | None = None) -> None:
    import importlib

    args = parse_args(argv)
    out = build_tiny_pipeline(args.backbone, args.out, seed=args.seed, controlnet=args.controlnet, preset=args.preset)
    print(f"wrote a {args.preset} {args.backbone.upper()} pipeline (seed {args.seed}) to {out}")
    for name, class_path in backbone_class(args.backbone).model_parts():
        if name == "controlnet" and not args.controlnet:
            continue
        module, cls = class_path.rsplit(".", 1)
        model = getattr(importlib.import_module(module), cls).from_pretrained(out / name)
        print(f"  {name + '/':<16} {count_parameters(model):>12,} parameters")
    print(f"use it with --pretrained_model_name_or_path {out}")


if __name__ == "__main__":
    run_cli(main)
