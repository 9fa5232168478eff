"""Pre-train a tiny base on skins (SDXL by default; --backbone zimage, qwenimage, ...), cached: the VAE fitted (SDXL)
or given, the denoiser trained by the one training loop (train_text_to_image.py's text-to-image loss).

    python scripts/pretrain_tiny_base.py --dataset_dir outputs/demo/base_corpus --output_dir outputs/demo/base

The rows need captions (caption.py). The output folder loads like the family's base pipeline
(``--pretrained_model_name_or_path``; for SDXL like stable-diffusion-xl-base-1.0) and holds ``controlnet/``, an
untrained ControlNet initialised from the trained denoiser (the start of ControlNet training). A second run with the
same settings and data reuses the folder (``pretrain.json`` holds the key).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skingen.backbones import FAMILIES, backbone_class  # noqa: E402
from skingen.config import parse_args_with_config  # noqa: E402
from skingen.errors import SkingenError, run_cli  # noqa: E402
from skingen.testing.base_pretraining import PretrainSettings, pretrain_tiny_base  # noqa: E402
from skingen.testing.tiny_sdxl import PRESETS  # noqa: E402
from skingen.train.options import lr_scheduler_names  # noqa: E402

DEFAULTS = PretrainSettings()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True, help="dataset folder whose captioned train rows are the skins")
    parser.add_argument("--output_dir", required=True, help="pipeline folder to write (or reuse when cached)")
    parser.add_argument("--backbone", default=DEFAULTS.backbone, choices=tuple(FAMILIES), help="the base model's family")
    parser.add_argument("--preset", default=DEFAULTS.preset, choices=sorted(PRESETS),
                        help="SDXL's tiny presets (the other families have 'tiny' only)")
    parser.add_argument("--resolution", type=int, default=DEFAULTS.resolution)
    parser.add_argument("--pretrained_vae_model_name_or_path", default=None,
                        help="a fitted VAE folder of the family to build the base around (e.g. assets/tiny_skin_vae, made "
                             "by scripts/fit_tiny_vae.py); default: a random tiny VAE, fitted here (SDXL only)")
    parser.add_argument("--vae_fit_steps", type=int, default=DEFAULTS.vae_fit_steps,
                        help="full-batch steps fitting the VAE to these skins (0: keep the pretrained VAE as it is)")
    parser.add_argument("--vae_learning_rate", type=float, default=DEFAULTS.vae_learning_rate, help="Adam learning rate of the VAE fit")
    parser.add_argument("--vae_fit_images", type=int, default=DEFAULTS.vae_fit_images,
                        help="images the VAE is fitted on (spread over the data; the fit is full-batch)")
    parser.add_argument("--max_train_steps", type=int, default=DEFAULTS.max_train_steps, help="denoiser training steps")
    parser.add_argument("--train_batch_size", type=int, default=DEFAULTS.train_batch_size)
    parser.add_argument("--learning_rate", type=float, default=DEFAULTS.learning_rate)
    parser.add_argument("--lr_scheduler", default=DEFAULTS.lr_scheduler,
                        choices=[name for name in lr_scheduler_names() if name != "piecewise_constant"],
                        help="denoiser learning-rate schedule (diffusers' get_scheduler names)")
    parser.add_argument("--proportion_empty_prompts", type=float, default=DEFAULTS.proportion_empty_prompts,
                        help="share of samples trained with the empty prompt (for classifier-free guidance)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    args = parse_args_with_config(parser, argv)
    for name in ("resolution", "max_train_steps", "train_batch_size", "vae_fit_images"):
        if getattr(args, name) < 1:
            raise SkingenError(f"--{name} must be >= 1, got {getattr(args, name)}")
    least_vae_steps = 0 if args.pretrained_vae_model_name_or_path else 1
    if args.vae_fit_steps < least_vae_steps:
        raise SkingenError(f"--vae_fit_steps must be >= {least_vae_steps}, got {args.vae_fit_steps} "
                           "(0, keeping the VAE as it is, needs --pretrained_vae_model_name_or_path)")
    for name in ("learning_rate", "vae_learning_rate"):
        if not getattr(args, name) > 0:
            raise SkingenError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.resolution % 8:
        raise SkingenError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise SkingenError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    settings = PretrainSettings(
        backbone=args.backbone, preset=args.preset, pretrained_vae=args.pretrained_vae_model_name_or_path, resolution=args.resolution,
        vae_fit_steps=args.vae_fit_steps, vae_fit_images=args.vae_fit_images,
        vae_learning_rate=args.vae_learning_rate,
        max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
        learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler, proportion_empty_prompts=args.proportion_empty_prompts, seed=args.seed,
    )
    record = pretrain_tiny_base(args.output_dir, args.dataset_dir, settings)
    if record["reused"]:
        print(f"reusing the pre-trained base in {args.output_dir} (same settings and data; {CACHE_NOTE})")
        return
    vae, denoiser = record["vae_fit"], record["denoiser_fit"]
    title = backbone_class(args.backbone).title
    print(f"pre-trained a {args.preset} {title} base on {record['images']} skins in {record['seconds']:.0f} s -> {args.output_dir}")
    if vae is None:
        print(f"  VAE: {args.pretrained_vae_model_name_or_path} as it is")
    else:
        print(f"  VAE reconstruction L1 {vae['initial_l1']:.3f} -> {vae['final_l1']:.3f} "
              f"({args.vae_fit_steps} steps on {min(args.vae_fit_images, record['images'])} skins)")
    print(f"  denoiser diffusion loss {denoiser['first_loss']:.4f} -> {denoiser['last_loss']:.4f} "
          f"(mean of the first and last tenth of {args.max_train_steps} steps)")


CACHE_NOTE = "delete the folder or change a setting to train again"

if __name__ == "__main__":
    run_cli(main)
