"""Fit a tiny VAE from scratch on skin atlases: the recipe of ``assets/tiny_skin_vae`` (tens of minutes on CPU).

    python scripts/make_synthetic_skins.py --out work/vae_skins --n 160 --seed 7000 --picture_fraction 0.5
    python merge_elements.py --packages_dir work/vae_skins --layout key_elements --resolution 512 --output_dir work/vae_atlases
    python scripts/fit_tiny_vae.py --dataset_dir work/vae_atlases --output_dir assets/tiny_skin_vae

The output is a diffusers VAE folder (plus ``recipe.json``: the settings, the fit's L1 and the latent normalisation
measured on the images) that ``scripts/pretrain_tiny_base.py --pretrained_vae_model_name_or_path`` builds a tiny
SDXL around. ``--backbone zimage`` fits a FLUX-style ``AutoencoderKL`` (shift and scale) and ``--backbone qwenimage``
an ``AutoencoderKLQwenImage`` (per-channel mean and std) for those families' tiny builders (``vae=``); add
``--conditioning_images`` there, as their ControlNets take the control through the VAE:

    python scripts/fit_tiny_vae.py --backbone qwenimage --dataset_dir datasets/layouts --conditioning_images \
      --resolution 64 --output_dir work/qwenimage_vae

Checkpoints go to ``<output_dir>.partial/`` every --checkpointing_steps; running the same command again resumes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skingen.config import parse_args_with_config  # noqa: E402
from skingen.errors import SkingenError, run_cli  # noqa: E402
from skingen.testing.base_pretraining import load_training_images  # noqa: E402
from skingen.testing.vae_fitting import (  # noqa: E402
    BACKBONES,
    RECIPE_FILE,
    VaeRecipe,
    dataset_pixels,
    fit_vae_from_scratch,
)

DEFAULTS = VaeRecipe()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", nargs="+", required=True, help="dataset folders whose train rows are the atlases")
    parser.add_argument("--output_dir", required=True, help="VAE folder to write (replaced when it holds an earlier fit)")
    parser.add_argument("--backbone", choices=BACKBONES, default=DEFAULTS.backbone,
                        help="whose VAE class and latent normalisation: sdxl (scaling_factor), zimage (FLUX-style "
                             "shift_factor and scaling_factor), qwenimage (AutoencoderKLQwenImage, latents_mean/std)")
    parser.add_argument("--conditioning_images", action="store_true",
                        help="also fit on the rows' conditioning images (Z-Image and Qwen-Image VAE-encode the control)")
    parser.add_argument("--block_out_channels", type=int, nargs=4, default=list(DEFAULTS.block_out_channels),
                        help="widths of the four VAE blocks (four: the VAE downsamples by 8, as the real ones)")
    parser.add_argument("--latent_channels", type=int, default=DEFAULTS.latent_channels)
    parser.add_argument("--layers_per_block", type=int, default=DEFAULTS.layers_per_block)
    parser.add_argument("--norm_num_groups", type=int, default=DEFAULTS.norm_num_groups)
    parser.add_argument("--resolution", type=int, default=DEFAULTS.resolution, help="atlases are resized to this square")
    parser.add_argument("--max_train_steps", type=int, default=DEFAULTS.steps)
    parser.add_argument("--train_batch_size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--learning_rate", type=float, default=DEFAULTS.learning_rate, help="peak of the one-cycle rate")
    parser.add_argument("--gradient_loss_weight", type=float, default=DEFAULTS.gradient_loss_weight,
                        help="weight of the L1 error of image differences (sharper edges)")
    parser.add_argument("--kl_weight", type=float, default=DEFAULTS.kl_weight)
    parser.add_argument("--initial_logvar", type=float, default=DEFAULTS.initial_logvar,
                        help="log-variance the posterior starts from (0 is diffusers' unit variance, where a tiny VAE "
                             "left half its latent channels unused)")
    parser.add_argument("--checkpointing_steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    args = parse_args_with_config(parser, argv)
    if args.checkpointing_steps < 1:
        raise SkingenError(f"--checkpointing_steps must be >= 1, got {args.checkpointing_steps}")
    output_dir = Path(args.output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / RECIPE_FILE).is_file():
        raise SkingenError(f"{output_dir}: exists and holds no {RECIPE_FILE} (not a fit of this script); "
                           "choose a new or empty --output_dir")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = VaeRecipe(
        backbone=args.backbone, block_out_channels=tuple(args.block_out_channels), latent_channels=args.latent_channels,
        layers_per_block=args.layers_per_block, norm_num_groups=args.norm_num_groups, resolution=args.resolution,
        steps=args.max_train_steps, batch_size=args.train_batch_size, learning_rate=args.learning_rate,
        gradient_loss_weight=args.gradient_loss_weight, kl_weight=args.kl_weight, initial_logvar=args.initial_logvar,
        seed=args.seed,
    )
    recipe.check()
    images = [image.pixels for image in load_training_images(args.dataset_dir, args.resolution)]
    if args.conditioning_images:
        images += [pixels for _, pixels in dataset_pixels(args.dataset_dir, args.resolution, "conditioning_image")]
    print(f"fitting a {args.backbone} VAE (blocks {list(recipe.block_out_channels)}, {recipe.latent_channels} latent channels) "
          f"on {len(images)} images at {recipe.resolution} px for {recipe.steps} steps")
    record = fit_vae_from_scratch(args.output_dir, images, recipe, checkpoint_dir=f"{args.output_dir}.partial",
                                  checkpointing_steps=args.checkpointing_steps)
    print(f"reconstruction L1 {record['initial_l1']:.3f} -> {record['final_l1']:.3f} in {record['seconds']:.0f} s of "
          f"fitting; wrote {args.output_dir}")


if __name__ == "__main__":
    run_cli(main)
