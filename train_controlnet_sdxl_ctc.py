#!/usr/bin/env python3
"""Train an SDXL ControlNet with the OCR text loss added to the diffusion loss (ControlNet++ / AnyText design).

    accelerate launch train_controlnet_sdxl_ctc.py --pretrained_model_name_or_path SDXL_DIR \
        --train_data_dir DATASET_DIR --output_dir OUT --resolution 512 --mixed_precision bf16 \
        --text_loss_type ctc --text_loss_weight 0.05 --text_loss_max_timestep 200

Every flag of train_controlnet_sdxl.py works here too. The dataset rows need ``box`` (4-point quads) and
``texts`` (or ``writing "..."`` in the caption). At each step, for samples with t <= --text_loss_max_timestep,
the model's one-step x0 estimate is decoded by the VAE only around the text boxes, each box is cropped as a
rotated rectangle and read by a frozen PP-OCRv4 recognizer (torch, from the ONNX weights in
rapidocr-onnxruntime or --recognizer_model_path); CTC and/or recognizer-feature MSE against the ground truth
is added with --text_loss_weight. Logs: loss_diffusion, loss_text (the weighted term), text_ctc /
text_perceptual (unweighted, over the boxes used), boxes_used, unknown_chars.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from skingen.errors import SkingenError, run_cli
from skingen.losses import TEXT_LOSS_TYPES, TIMESTEP_WEIGHTINGS, TextLoss
from skingen.recognizer import load_recognizer
from skingen.training import build_arg_parser, parse_training_args, train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_arg_parser("Train an SDXL ControlNet on a skin dataset with an OCR text loss.")
    text = parser.add_argument_group("text loss")
    text.add_argument("--text_loss_type", choices=TEXT_LOSS_TYPES, default="ctc",
                      help="ctc: recognizer CTC against the box texts; perceptual: MSE of recognizer neck features "
                           "between generated and ground-truth crops (AnyText); both: their sum.")
    text.add_argument("--text_loss_weight", type=float, default=0.05,
                      help="Multiplier of the text loss added to the diffusion loss.")
    text.add_argument("--text_loss_max_timestep", type=int, default=200,
                      help="Apply the text loss only where t <= this (of 1000); the one-step x0 estimate is "
                           "unreadable at high noise. Set it to 1000 to use every step (with alpha_bar weighting).")
    text.add_argument("--text_loss_timestep_weighting", choices=TIMESTEP_WEIGHTINGS, default="none",
                      help="alpha_bar: weight each sample's text loss by alpha_bar_t, as AnyText does.")
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
    args = parse_training_args(parser, argv)
    if args.text_loss_weight < 0:
        raise SkingenError(f"--text_loss_weight must not be negative, got {args.text_loss_weight}")
    if args.text_loss_max_timestep < 0:
        raise SkingenError(f"--text_loss_max_timestep must not be negative, got {args.text_loss_max_timestep}")
    return args


def build_text_loss(args: argparse.Namespace) -> TextLoss:
    return TextLoss(
        load_recognizer(args.recognizer_model_path, character_dict_path=args.recognizer_char_dict),
        loss_type=args.text_loss_type,
        weight=args.text_loss_weight,
        max_timestep=args.text_loss_max_timestep,
        timestep_weighting=args.text_loss_timestep_weighting,
        tile_margin=args.text_loss_tile_margin,
        max_boxes_per_row=args.text_loss_max_boxes,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = train(args, extra_loss=build_text_loss(args))
    if result.is_main_process:
        print(f"trained {result.global_step} steps with the text loss; ControlNet weights in {result.output_dir}")


if __name__ == "__main__":
    run_cli(main)
