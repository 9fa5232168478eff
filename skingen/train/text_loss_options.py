"""The OCR text-loss flags of every trainer script, and the loss they build (``skingen.train.text_loss.TextLoss``).

Every trainer takes the flags with the loss off unless ``--text_loss_weight`` is given, so diffusers' command lines
run unchanged; ``train_controlnet_sdxl_ctc.py`` is the SDXL trainer with ``--text_loss_weight 0.01`` by default. Weight 0 measures the loss (logged) without adding it.
``--text_loss_max_timestep`` is on the scheduler's 0..1000 scale: DDPM steps for SDXL, sigma x 1000 for SD3/FLUX.
"""

from __future__ import annotations

import argparse

from ..errors import SkingenError
from .text_loss import TEXT_LOSS_TYPES, TIMESTEP_WEIGHTINGS, TextLoss


def add_text_loss_arguments(parser: argparse.ArgumentParser) -> None:
    text = parser.add_argument_group("text loss")
    text.add_argument("--text_loss_type", choices=TEXT_LOSS_TYPES, default="ctc",
                      help="ctc: recognizer CTC against the box texts; perceptual: MSE of recognizer neck features "
                           "between generated and ground-truth crops (AnyText); both: their sum.")
    text.add_argument("--text_loss_weight", type=float, default=None,
                      help="Multiplier of the text loss added to the diffusion loss (0: measured and logged, not "
                           "added); unset: no text loss (train_controlnet_sdxl_ctc.py: 0.01).")
    text.add_argument("--text_loss_max_timestep", type=int, default=200,
                      help="Apply the text loss only where the noise level is at most this (of 1000: the DDPM step, or "
                           "sigma x 1000 for flow matching); the one-step x0 estimate is unreadable at high noise. "
                           "Set it to 1000 to use every step (with alpha_bar weighting).")
    text.add_argument("--text_loss_timestep_weighting", choices=TIMESTEP_WEIGHTINGS, default="none",
                      help="alpha_bar: weight each sample's text loss by its signal fraction (alpha_bar_t, or "
                           "(1 - sigma)^2 for flow matching), as AnyText does.")
    text.add_argument("--text_loss_tile_margin", type=int, default=4,
                      help="Latent cells of context decoded around each text box (the VAE decodes tiles, not the image).")
    text.add_argument("--text_loss_max_boxes", type=int, default=16,
                      help="At most this many boxes per sample and step (a random subset), to bound the decode cost.")
    text.add_argument("--recognizer_model_path", type=str, default=None,
                      help="A PP-OCRv4 recognition ONNX file (e.g. a PaddleOCR checkpoint exported with paddle2onnx); "
                           "default: ch_PP-OCRv4_rec_infer.onnx from rapidocr-onnxruntime.")
    text.add_argument("--recognizer_char_dict", type=str, default=None,
                      help="The recognizer's character dictionary (PaddleOCR rec_char_dict_path), needed when the "
                           "ONNX file carries no 'character' metadata.")


def check_text_loss_arguments(args: argparse.Namespace) -> None:
    if args.text_loss_weight is not None and args.text_loss_weight < 0:
        raise SkingenError(f"--text_loss_weight must not be negative, got {args.text_loss_weight}")
    if args.text_loss_max_timestep < 0:
        raise SkingenError(f"--text_loss_max_timestep must not be negative, got {args.text_loss_max_timestep}")


def build_text_loss(args: argparse.Namespace) -> TextLoss | None:
    """The text loss the flags describe; None when ``--text_loss_weight`` is unset (SD3/FLUX trainers' default)."""
    if args.text_loss_weight is None:
        return None
    from .recognizer import load_recognizer

    return TextLoss(
        load_recognizer(args.recognizer_model_path, character_dict_path=args.recognizer_char_dict),
        loss_type=args.text_loss_type,
        weight=args.text_loss_weight,
        max_timestep=args.text_loss_max_timestep,
        timestep_weighting=args.text_loss_timestep_weighting,
        tile_margin=args.text_loss_tile_margin,
        max_boxes_per_row=args.text_loss_max_boxes,
    )
