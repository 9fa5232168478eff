#!/usr/bin/env bash
# Submit the whole data preparation to Slurm as a chain of jobs, each starting when the one before succeeded:
#   1 merge_elements (one task, NUM_WORKERS processes)
#   2 render_glyphs as a job array of SHARDS tasks, then its merge step
#   3 caption as a job array of SHARDS tasks, then its merge step
#   4 filter_dataset + train/validation split
#
# Usage: PACKAGES_DIR=/shared/skins DATA_DIR=/shared/datasets/kb512 SHARDS=32 bash scripts/slurm/prepare.sh
# Variables of scripts/slurm/prepare.sbatch (LAYOUT, RESOLUTION, CONDITIONING, CAPTIONER, BLIP_MODEL, NUM_WORKERS,
# VAL_FRACTION, PYTHON) pass through; CAPTION_GPUS=1 asks for a GPU per caption task (BLIP).
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${PACKAGES_DIR:?set PACKAGES_DIR to the folder of skin packages}"
: "${DATA_DIR:?set DATA_DIR to the dataset folder to write (on shared storage)}"
SHARDS=${SHARDS:-16}
CAPTION_GPUS=${CAPTION_GPUS:-0}
export PACKAGES_DIR DATA_DIR

submit() {  # submit [sbatch options...]: the job id
  sbatch --parsable --export=ALL "$@" scripts/slurm/prepare.sbatch | cut -d';' -f1
}

merged=$(STAGE=merge_elements submit)
glyphs=$(STAGE=render_glyphs submit --dependency="afterok:$merged" --array="0-$((SHARDS - 1))")
glyphs_merged=$(STAGE=render_glyphs submit --dependency="afterok:$glyphs")
gpu=()
if [ "$CAPTION_GPUS" != 0 ]; then gpu=(--gpus-per-task="$CAPTION_GPUS"); fi
captions=$(STAGE=caption submit "${gpu[@]}" --dependency="afterok:$glyphs_merged" --array="0-$((SHARDS - 1))")
captions_merged=$(STAGE=caption submit --dependency="afterok:$captions")
filtered=$(STAGE=filter submit --dependency="afterok:$captions_merged")
echo "submitted: merge $merged, render_glyphs $glyphs (+ merge $glyphs_merged), caption $captions" \
  "(+ merge $captions_merged), filter + split $filtered"
