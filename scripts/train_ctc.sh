#!/usr/bin/env bash
# Train a ControlNet with the OCR text loss (the CTC experiment, done the ControlNet++/AnyText way:
# one-step x0 at t <= TEXT_LOSS_MAX_TIMESTEP, VAE decode around the text boxes, frozen PP-OCRv4 recognizer).
#
# Usage: MODEL_DIR=/models/stable-diffusion-xl-base-1.0 DATA_DIR=datasets/keyboard_512 bash scripts/train_ctc.sh [more flags]
#        BACKBONE=flux MODEL_DIR=/models/FLUX.1-dev DATA_DIR=... bash scripts/train_ctc.sh
# The dataset rows need "box" (4-point quads) and "texts" (render_glyphs.py --mode glyph writes both).
# BACKBONE=sdxl runs train_controlnet_sdxl_ctc.py; sd3 and flux run train_controlnet_sd3.py / _flux.py with the same
# text-loss flags (there, timesteps are sigma x 1000: TEXT_LOSS_MAX_TIMESTEP=200 means sigma <= 0.2).
# Every variable of scripts/train.sh applies too (BACKBONE, MODEL_DIR, DATA_DIR, OUTPUT_DIR, ACCELERATE_CONFIG,
# RESOLUTION, ...); extra arguments go to the training script and win over the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

TEXT_LOSS_TYPE=${TEXT_LOSS_TYPE:-ctc}                  # ctc | perceptual | both
# 0.01: on held-out layouts (bench/text_loss_ab.py, tiny models) 0.05 cost 4% diffusion loss, 0.01 nothing; no gain
# on held-out sampled text has been shown at any weight yet; check your data with the bench (docs/text_loss.md).
TEXT_LOSS_WEIGHT=${TEXT_LOSS_WEIGHT:-0.01}
TEXT_LOSS_MAX_TIMESTEP=${TEXT_LOSS_MAX_TIMESTEP:-200}  # of 1000; ControlNet++ uses 200
TEXT_LOSS_WEIGHTING=${TEXT_LOSS_WEIGHTING:-none}       # none | alpha_bar (AnyText)
RECOGNIZER_MODEL=${RECOGNIZER_MODEL:-}                 # a PP-OCRv4 rec .onnx; empty: the one in rapidocr-onnxruntime
# val_text_ctc / val_loss_diffusion at these timesteps with fixed noise, every VALIDATION_STEPS: the curves to
# compare runs by (docs/text_loss.md). Empty: off.
VALIDATION_LOSS_TIMESTEPS=${VALIDATION_LOSS_TIMESTEPS-50 150 250}

recognizer_flag=()
if [ -n "$RECOGNIZER_MODEL" ]; then
  recognizer_flag=(--recognizer_model_path "$RECOGNIZER_MODEL")
fi
validation_loss_flag=()
if [ -n "$VALIDATION_LOSS_TIMESTEPS" ]; then
  read -r -a timesteps <<< "$VALIDATION_LOSS_TIMESTEPS"
  validation_loss_flag=(--validation_loss_timesteps "${timesteps[@]}")
fi

BACKBONE=${BACKBONE:-sdxl}
case "$BACKBONE" in
  sdxl) train_script=train_controlnet_sdxl_ctc.py ;;
  sd3 | flux | zimage | qwenimage) train_script=train_controlnet_$BACKBONE.py ;;
  *) echo "error: BACKBONE=$BACKBONE: choose sdxl, sd3, flux, zimage or qwenimage" >&2; exit 2 ;;
esac

OUTPUT_DIR=${OUTPUT_DIR:-outputs/controlnet_ctc} BACKBONE=$BACKBONE TRAIN_SCRIPT=$train_script exec bash scripts/train.sh \
  --text_loss_type "$TEXT_LOSS_TYPE" \
  --text_loss_weight "$TEXT_LOSS_WEIGHT" \
  --text_loss_max_timestep "$TEXT_LOSS_MAX_TIMESTEP" \
  --text_loss_timestep_weighting "$TEXT_LOSS_WEIGHTING" \
  "${recognizer_flag[@]}" \
  "${validation_loss_flag[@]}" \
  "$@"
