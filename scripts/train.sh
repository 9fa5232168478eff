#!/usr/bin/env bash
# Train an SDXL, SD3/SD3.5, FLUX.1, Z-Image or Qwen-Image ControlNet with accelerate (the seed's controlnet.sh, with skingen's defaults).
#
# Usage: MODEL_DIR=/models/stable-diffusion-xl-base-1.0 DATA_DIR=datasets/keyboard_512 bash scripts/train.sh [more flags]
#        BACKBONE=sd3 MODEL_DIR=/models/stable-diffusion-3.5-medium DATA_DIR=... bash scripts/train.sh
#        BACKBONE=qwenimage MODEL_DIR=/models/Qwen-Image DATA_DIR=... bash scripts/train.sh --config configs/train/qwenimage_glyph_1328.yaml
# BACKBONE (sdxl | sd3 | flux | zimage | qwenimage) picks train_controlnet_$BACKBONE.py. Every variable below can be set from the
# environment; extra arguments go to the training script and win over the defaults here (e.g.
# --config configs/train/sd35_medium_glyph_1024.yaml, --resume_from_checkpoint latest).
set -euo pipefail
cd "$(dirname "$0")/.."

BACKBONE=${BACKBONE:-sdxl}
case "$BACKBONE" in
  sdxl) default_model=stabilityai/stable-diffusion-xl-base-1.0 ;;
  sd3) default_model=stabilityai/stable-diffusion-3.5-medium ;;
  flux) default_model=black-forest-labs/FLUX.1-dev ;;
  zimage) default_model=Tongyi-MAI/Z-Image-Turbo ;;
  qwenimage) default_model=Qwen/Qwen-Image ;;
  *) echo "error: BACKBONE=$BACKBONE: choose sdxl, sd3, flux, zimage or qwenimage" >&2; exit 2 ;;
esac
MODEL_DIR=${MODEL_DIR:-$default_model}        # the base pipeline: local folder or hub id
DATA_DIR=${DATA_DIR:?set DATA_DIR to a prepared dataset folder (train.jsonl + images/ + conditioning_images/)}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/controlnet}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/single_gpu.yaml}
CONTROLNET_DIR=${CONTROLNET_DIR:-}           # e.g. a Canny ControlNet of the same family to fine-tune; empty: from the base
RESOLUTION=${RESOLUTION:-512}
BATCH_SIZE=${BATCH_SIZE:-4}                  # per GPU
GRAD_ACCUM=${GRAD_ACCUM:-1}
LEARNING_RATE=${LEARNING_RATE:-1e-5}
MAX_STEPS=${MAX_STEPS:-6000}
MIXED_PRECISION=${MIXED_PRECISION:-bf16}
CHECKPOINT_STEPS=${CHECKPOINT_STEPS:-1000}
VALIDATION_STEPS=${VALIDATION_STEPS:-500}
SEED=${SEED:-42}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-train_controlnet_$BACKBONE.py}   # scripts/train_ctc.sh sets the text-loss trainer

controlnet_flag=()
if [ -n "$CONTROLNET_DIR" ]; then
  controlnet_flag=(--controlnet_model_name_or_path "$CONTROLNET_DIR")
fi
validation_flag=()
if [ -f "$DATA_DIR/validation.jsonl" ]; then
  validation_flag=(--validation_split validation)
fi

exec accelerate launch --config_file "$ACCELERATE_CONFIG" "$TRAIN_SCRIPT" \
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
  "$@"
