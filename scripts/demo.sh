#!/usr/bin/env bash
# The main job on the embedded default: every stage of skingen end to end, offline, on CPU.
# Tiny random-weight SDXL built locally + synthetic skin packages -> atlases -> glyph conditioning
# -> captions -> ControlNet training with the OCR text loss -> batch generation -> skin packages
# -> evaluation -> outputs/demo/report.md. The numbers measure the pipeline, not image quality:
# a 1M-parameter random UNet trained for minutes cannot draw keyboards.
#
# Sizes can be turned down (CI does) or up: NUM_SKINS, TRAIN_STEPS, RESOLUTION, OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

OUT=${OUT:-outputs/demo}
NUM_SKINS=${NUM_SKINS:-24}          # synthetic skin packages
ATLAS_RESOLUTION=${ATLAS_RESOLUTION:-512}  # atlases are made at 512 so OCR can read the key labels
RESOLUTION=${RESOLUTION:-128}       # training and generation size on the tiny model
TRAIN_STEPS=${TRAIN_STEPS:-300}
INFERENCE_STEPS=${INFERENCE_STEPS:-20}
LAYOUT=key_elements
MODEL=$OUT/tiny-sdxl
DATA=$OUT/dataset

stage() { printf '\n== %s\n' "$*"; }

stage "1/9 build a tiny SDXL pipeline from configs (random weights, no download) -> $MODEL"
if [ -f "$MODEL/model_index.json" ]; then echo "already built"; else
  python3 scripts/make_tiny_sdxl.py --out "$MODEL" --preset tiny --seed 0
fi

stage "2/9 synthesise $NUM_SKINS skin packages (folders and zips, some 9-patch keys) -> $OUT/skins"
python3 scripts/make_synthetic_skins.py --out "$OUT/skins" --n "$NUM_SKINS" --seed 0

stage "3/9 merge each package's elements onto one $ATLAS_RESOLUTION px canvas (layout $LAYOUT) -> $DATA"
python3 merge_elements.py --packages_dir "$OUT/skins" --layout "$LAYOUT" --resolution "$ATLAS_RESOLUTION" \
  --output_dir "$DATA" --num_workers 2

stage "4/9 glyph conditioning: layout template + each skin's own text found by OCR"
python3 render_glyphs.py --dataset_dir "$DATA" --mode glyph --min_confidence 0.98

stage "5/9 captions (template captioner: no weights needed; use --captioner blip with a local BLIP on real data)"
python3 caption.py --dataset_dir "$DATA" --captioner template

stage "6/9 hold out a validation split"
python3 dataset_tool.py split "$DATA" --val_fraction 0.25 --seed 0
python3 dataset_tool.py validate "$DATA"

stage "7/9 train a ControlNet for $TRAIN_STEPS steps at $RESOLUTION px with the OCR text loss -> $OUT/controlnet"
python3 train_controlnet_sdxl_ctc.py \
  --pretrained_model_name_or_path "$MODEL" --train_data_dir "$DATA" --output_dir "$OUT/controlnet" \
  --resolution "$RESOLUTION" --train_batch_size 4 --max_train_steps "$TRAIN_STEPS" \
  --learning_rate 1e-3 --lr_warmup_steps 10 --checkpointing_steps 100 --checkpoints_total_limit 1 \
  --validation_steps "$TRAIN_STEPS" --validation_split validation --num_validation_images 2 \
  --text_loss_type ctc --text_loss_weight 0.05 --text_loss_max_boxes 4 --seed 0 \
  --resume_from_checkpoint latest

stage "8/9 generate skins for the held-out layouts and cut them into skin packages -> $OUT/generated"
python3 inference.py --pretrained_model_name_or_path "$MODEL" --controlnet "$OUT/controlnet" \
  --dataset_dir "$DATA" --split validation --resolution "$RESOLUTION" \
  --num_inference_steps "$INFERENCE_STEPS" --num_images_per_prompt 2 --batch_size 4 --seed 0 \
  --split_elements "$LAYOUT" --output_dir "$OUT/generated"

stage "9/9 evaluate layout adherence (Canny F1) and text accuracy (OCR) -> $OUT/generated/metrics.md"
python3 evaluate.py --results_dir "$OUT/generated"

python3 scripts/demo_report.py --demo_dir "$OUT"
