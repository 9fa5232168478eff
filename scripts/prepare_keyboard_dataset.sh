#!/usr/bin/env bash
# The whole data preparation chain for one source of skin packages:
#   packages -> atlases (merge_elements) -> conditioning images (render_glyphs)
#   -> captions (caption) -> bad-sample report + filtered rows (filter_dataset) -> train/validation split.
#
# Usage: PACKAGES_DIR=skins/ OUTPUT_DIR=datasets/keyboard_512 bash scripts/prepare_keyboard_dataset.sh
# Every variable below can be set from the environment; extra arguments go to caption.py.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES_DIR=${PACKAGES_DIR:?set PACKAGES_DIR to a folder of skin packages (folders or .zip)}
OUTPUT_DIR=${OUTPUT_DIR:?set OUTPUT_DIR to the dataset folder to write}
LAYOUT=${LAYOUT:-key_elements}          # a name in configs/layouts/ or a YAML path
RESOLUTION=${RESOLUTION:-512}           # 512 or 1024
CONDITIONING=${CONDITIONING:-glyph}     # canny | template | glyph | reference | reference_glyph
REFERENCE_IMAGE=${REFERENCE_IMAGE:-}    # reference modes: the skin whose Canny edges every row shares
CAPTIONER=${CAPTIONER:-template}        # template (no weights) | blip
BLIP_MODEL=${BLIP_MODEL:-Salesforce/blip-image-captioning-large}  # a local path offline
NUM_WORKERS=${NUM_WORKERS:-2}
MIN_EDGE_F1=${MIN_EDGE_F1:-0.0}         # raise (e.g. 0.3) to drop atlases whose layers do not line up
VAL_FRACTION=${VAL_FRACTION:-0.1}

echo "== 1/5 merge skin packages from $PACKAGES_DIR with layout $LAYOUT at $RESOLUTION px"
python3 merge_elements.py --packages_dir "$PACKAGES_DIR" --layout "$LAYOUT" --resolution "$RESOLUTION" \
  --output_dir "$OUTPUT_DIR" --num_workers "$NUM_WORKERS" --skip_incomplete

echo "== 2/5 conditioning images ($CONDITIONING)"
python3 render_glyphs.py --dataset_dir "$OUTPUT_DIR" --mode "$CONDITIONING" --layout "$LAYOUT" --resolution "$RESOLUTION" \
  ${REFERENCE_IMAGE:+--reference_image "$REFERENCE_IMAGE"}

echo "== 3/5 captions ($CAPTIONER)"
if [ "$CAPTIONER" = blip ]; then
  python3 caption.py --dataset_dir "$OUTPUT_DIR" --captioner blip --model "$BLIP_MODEL" "$@"
else
  python3 caption.py --dataset_dir "$OUTPUT_DIR" --captioner template "$@"
fi

echo "== 4/5 score samples and drop bad ones (report in $OUTPUT_DIR/filter_report.md)"
python3 scripts/filter_dataset.py --dataset_dir "$OUTPUT_DIR" --min_edge_f1 "$MIN_EDGE_F1" \
  --output_jsonl "$OUTPUT_DIR/train.filtered.jsonl"
# The kept rows become the training rows; every merged row stays in train.unfiltered.jsonl.
cp "$OUTPUT_DIR/train.jsonl" "$OUTPUT_DIR/train.unfiltered.jsonl"
mv "$OUTPUT_DIR/train.filtered.jsonl" "$OUTPUT_DIR/train.jsonl"

echo "== 5/5 deterministic train/validation split"
python3 dataset_tool.py split "$OUTPUT_DIR" --val_fraction "$VAL_FRACTION" --seed 0
python3 dataset_tool.py validate "$OUTPUT_DIR"
