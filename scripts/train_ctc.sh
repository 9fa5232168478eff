#!/usr/bin/env bash
# Train an SDXL ControlNet with the OCR text loss (the seed's CTC experiment, done the ControlNet++/AnyText way:
# one-step x0 at t <= TEXT_LOSS_MAX_TIMESTEP, VAE decode around the text boxes, frozen PP-OCRv4 recognizer).
#
# Usage: MODEL_DIR=/models/stable-diffusion-xl-base-1.0 DATA_DIR=datasets/keyboard_512 bash scripts/train_ctc.sh [more flags]
# The dataset rows need "box" (4-point quads) and "texts" (render_glyphs.py --mode glyph writes both).
# Every variable below can be set from the environment; extra arguments go to train_controlnet_sdxl_ctc.py and win
# over the defaults here (e.g. --config configs/train/<preset>.yaml, --resume_from_checkpoint latest).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=${MODEL_DIR:-stabilityai/stable-diffusion-xl-base-1.0}   # SDXL base: local folder or hub id
DATA_DIR=${DATA_DIR:?set DATA_DIR to a prepared dataset folder (train.jsonl with box + texts, images/, conditioning_images/)}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/controlnet_ctc}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/single_gpu.yaml}
CONTROLNET_DIR=${CONTROLNET_DIR:-}           # e.g. the ControlNet from scripts/train.sh to fine-tune; empty: from the UNet
RESOLUTION=${RESOLUTION:-512}
BATCH_SIZE=${BATCH_SIZE:-4}                  # per GPU
GRAD_ACCUM=${GRAD_ACCUM:-1}
LEARNING_RATE=${LEARNING_RATE:-1e-5}
MAX_STEPS=${MAX_STEPS:-6000}
MIXED_PRECISION=${MIXED_PRECISION:-bf16}
CHECKPOINT_STEPS=${CHECKPOINT_STEPS:-1000}
VALIDATION_STEPS=${VALIDATION_STEPS:-500}
SEED=${SEED:-42}
TEXT_LOSS_TYPE=${TEXT_LOSS_TYPE:-ctc}                  # ctc | perceptual | both
TEXT_LOSS_WEIGHT=${TEXT_LOSS_WEIGHT:-0.05}
TEXT_LOSS_MAX_TIMESTEP=${TEXT_LOSS_MAX_TIMESTEP:-200}  # of 1000; ControlNet++ uses 200
TEXT_LOSS_WEIGHTING=${TEXT_LOSS_WEIGHTING:-none}       # none | alpha_bar (AnyText)
RECOGNIZER_MODEL=${RECOGNIZER_MODEL:-}                 # a PP-OCRv4 rec .onnx; empty: the one in rapidocr-onnxruntime

controlnet_flag=()
if [ -n "$CONTROLNET_DIR" ]; then
  controlnet_flag=(--controlnet_model_name_or_path "$CONTROLNET_DIR")
fi
recognizer_flag=()
if [ -n "$RECOGNIZER_MODEL" ]; then
  recognizer_flag=(--recognizer_model_path "$RECOGNIZER_MODEL")
fi
validation_flag=()
if [ -f "$DATA_DIR/validation.jsonl" ]; then
  validation_flag=(--validation_split validation)
fi

exec accelerate launch --config_file "$ACCELERATE_CONFIG" train_controlnet_sdxl_ctc.py \
  --pretrained_model_name_or_path "$MODEL_DIR" \
  "${controlnet_flag[@]}" \
  --train_data_dir "$DATA_DIR" \
  --output_dir "$OUTPUT_DIR" \
  --resolution "$RESOLUTION" \
  --train_batch_size "$BATCH_SIZE" \
  --gradient_accumulation_steps "$GRAD_ACCUM" \
  --learning_rate "$LEARNING_RATE" \
  --max_train_steps "$MAX_STEPS" \
  --mixed_precision "$MIXED_PRECISION" \
  --checkpointing_steps "$CHECKPOINT_STEPS" \
  --checkpoints_total_limit 5 \
  --validation_steps "$VALIDATION_STEPS" \
  "${validation_flag[@]}" \
  --seed "$SEED" \
  --report_to tensorboard \
  --text_loss_type "$TEXT_LOSS_TYPE" \
  --text_loss_weight "$TEXT_LOSS_WEIGHT" \
  --text_loss_max_timestep "$TEXT_LOSS_MAX_TIMESTEP" \
  --text_loss_timestep_weighting "$TEXT_LOSS_WEIGHTING" \
  "${recognizer_flag[@]}" \
  "$@"
