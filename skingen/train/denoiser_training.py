"""Training the denoiser itself (the UNet or transformer of a base model) with the one training loop, as diffusers'
``examples/text_to_image/train_text_to_image_sdxl.py`` (kohya: ``sdxl_train.py``) trains a base: text-to-image
diffusion loss, no ControlNet.

The mode is ``args.train_denoiser`` (set by ``train_text_to_image.py`` through :func:`build_denoiser_arg_parser`):
the loop's trained model is then the backbone's denoiser, kept in fp32, and everything that handles the trained model
(optimizer, accelerate's ``prepare``, ``--use_ema``, checkpoints, exact resume, the final save) handles it. The
final weights go to ``OUTPUT_DIR/unet`` or ``OUTPUT_DIR/transformer`` (the EMA's to ``OUTPUT_DIR/ema/<same>``), in
diffusers' layout, so the folder can replace the base pipeline's own. Checkpoints hold ``checkpoint-N/unet`` (or
``transformer``) instead of ``checkpoint-N/controlnet``.

Conditioning images may be in the rows and are not read by the step. The row reader needs one per row, so without
``--conditioning_image_column`` the target image stands in for it (rows of a plain text-to-image dataset load); the
training samples then carry one black pixel instead of decoding it (:func:`without_controls`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..backbones import FAMILIES, backbone_class
from ..data.training_rows import TrainingRows
from ..errors import require
from .args import build_arg_parser, parse_training_args
from .caching import place_model
from .checkpoints import CONTROLNET_SUBFOLDER

# The dataset key of the target image (both dataset forms accept it: ImageFolder's "file_name" is tried next).
TARGET_IMAGE_KEY = "image"


def trains_denoiser(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "train_denoiser", False))


def trained_subfolder(args: argparse.Namespace) -> str:
    """The folder name of the trained model in checkpoints: ``controlnet``, or the denoiser's (``unet``,
    ``transformer``) when the denoiser is trained."""
    if not trains_denoiser(args):
        return CONTROLNET_SUBFOLDER
    return backbone_class(getattr(args, "backbone", "sdxl")).denoiser_subfolder


def weights_folder(args: argparse.Namespace, folder: Path) -> Path:
    """Where the final weights go under ``folder``: itself for a ControlNet (diffusers' ControlNet trainers), the
    denoiser's subfolder for a trained denoiser (the base pipeline's layout)."""
    return folder / trained_subfolder(args) if trains_denoiser(args) else folder


def build_denoiser_arg_parser(backbone: str = "sdxl") -> argparse.ArgumentParser:
    """The trainer's flags for training ``backbone``'s denoiser (the ControlNet flags are refused when given)."""
    family = backbone_class(backbone)
    parser = build_arg_parser(f"Train the {family.title} base model's {family.denoiser_subfolder} itself "
                              "(text-to-image diffusion loss, no ControlNet) on a skin dataset.", backbone=backbone)
    parser.add_argument("--backbone", choices=tuple(FAMILIES), default=backbone,
                        help="The base model's family (its own flags are listed under its name).")
    parser.set_defaults(train_denoiser=True, output_dir=f"{backbone}-{family.denoiser_subfolder}-model",
                        tracker_project_name="text2image-fine-tune")
    return parser


def parse_denoiser_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse (``--config`` included) and check the flags of :func:`build_denoiser_arg_parser` for the family that
    ``--backbone`` names (read first: each family has flags of its own)."""
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--backbone", choices=tuple(FAMILIES), default="sdxl")
    known, _ = chooser.parse_known_args(argv)
    args = parse_training_args(build_denoiser_arg_parser(known.backbone), argv)
    check_denoiser_args(args)
    return args


def check_denoiser_args(args: argparse.Namespace) -> None:
    """Refuse the flags that only mean something with a ControlNet; let the target image stand in as the
    conditioning image the row reader requires."""
    what = "trains the denoiser itself, without a ControlNet"
    require(args.controlnet_model_name_or_path is None,
            f"--controlnet_model_name_or_path: this run {what}; drop the flag")
    require(args.controlnet_conditioning_init == "diffusers",
            f"--controlnet_conditioning_init: this run {what}; drop the flag")
    require(not getattr(args, "unet_lora_rank", 0),
            f"--unet_lora_rank: this run {what} and trains every weight of it; drop the flag")
    require(args.validation_prompt is None and args.validation_image is None,
            f"--validation_prompt/--validation_image draw ControlNet grids; this run {what}. Follow it with "
            "--validation_loss_timesteps (and --validation_split for held-out rows) instead")
    require(not getattr(args, "edge_loss_weight", 0),
            f"--edge_loss_weight compares generated edges with the control; this run {what}; drop the flag")
    require(getattr(args, "base_quantization", None) in (None, "none"),
            "--base_quantization holds a frozen denoiser quantized; this run trains it; drop the flag")
    if args.conditioning_image_column is None and args.train_data_dir is not None:
        args.conditioning_image_column = [args.image_column or TARGET_IMAGE_KEY]


def trainable_denoiser(backbone) -> torch.nn.Module:
    """The backbone's denoiser made the trained model: fp32 on the CPU until ``prepare`` (as a new ControlNet),
    gradients on."""
    denoiser = place_model(backbone.denoiser, "cpu", torch.float32)
    denoiser.requires_grad_(True)
    return denoiser


class RowsWithoutControls(TrainingRows):
    """Training rows whose every conditioning image is one black pixel: the step reads none, and decoding a
    full-size image per sample would cost more than a tiny model's step."""

    def __init__(self, rows: TrainingRows):
        super().__init__(rows.rows, rows.stored)

    def conditioning_images(self, index: int) -> list[Image.Image]:
        return [Image.new("RGB", (1, 1))] * self.conditioning_count


def without_controls(rows: TrainingRows) -> TrainingRows:
    return RowsWithoutControls(rows)
