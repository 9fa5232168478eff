"""scripts/slurm/prepare.sh (+ prepare.sbatch) and generate.sbatch run the whole preparation and generation, with
stand-ins for Slurm's commands: ``sbatch`` runs the job at once (an array: each task in turn, with Slurm's array
variables), ``srun`` runs its command as the only node, ``scontrol`` names this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from repo_scripts import REPO, load_script

FAKE_SBATCH = r"""#!/usr/bin/env bash
array=""; args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --array=*) array=${1#--array=} ;;
    --parsable|--export=*|--dependency=*|--gpus-per-task=*) ;;
    *) args+=("$1") ;;
  esac
  shift
done
echo "sbatch STAGE=$STAGE array=$array" >> "$SLURM_LOG"
if [ -n "$array" ]; then
  first=${array%-*}; last=${array#*-}
  for i in $(seq "$first" "$last"); do
    SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_COUNT=$((last - first + 1)) bash "${args[@]}" >> "$SLURM_LOG" 2>&1 || exit 1
  done
else
  bash "${args[@]}" >> "$SLURM_LOG" 2>&1 || exit 1
fi
echo "$RANDOM"
"""
FAKE_SRUN = """#!/usr/bin/env bash
while [ "${1#--}" != "$1" ]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo localhost
"""


@pytest.fixture
def slurm_env(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
            "PYTHON": sys.executable, "SLURM_LOG": str(tmp_path / "slurm.log"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


@pytest.mark.slow
def test_prepare_chain_shards_render_and_caption_then_merges(slurm_env, tmp_path):
    packages, data_dir = tmp_path / "skins", tmp_path / "dataset"
    load_script("scripts/make_synthetic_skins.py").make_synthetic_skins(packages, 5, 0)
    env = {**slurm_env, "PACKAGES_DIR": str(packages), "DATA_DIR": str(data_dir), "SHARDS": "2", "NUM_WORKERS": "1",
           "VAL_FRACTION": "0.2"}  # fmt: skip
    finished = subprocess.run(["bash", "scripts/slurm/prepare.sh"], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=900)  # fmt: skip
    log = Path(env["SLURM_LOG"]).read_text()
    assert finished.returncode == 0, finished.stderr + log[-3000:]
    assert "process 1 of 2:" in log  # the second array task did its shard
    merged = [json.loads(line) for line in (data_dir / "train.unfiltered.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for name in ("train.jsonl", "validation.jsonl") if (data_dir / name).is_file()
            for line in (data_dir / name).read_text().splitlines()]  # fmt: skip
    assert len(merged) == 5 and 1 <= len(kept) <= 5  # every skin merged; the filter and split ran
    for row in merged:
        assert (data_dir / row["conditioning_image"]).is_file() and "iflyskin" in row["text"]
        assert "box" in row and "texts" in row
    assert not (data_dir / ".parts").exists()  # the merge steps merged and removed every part


@pytest.mark.slow
def test_generate_sbatch_generates_and_evaluates_on_two_processes(slurm_env, tiny_sdxl_dir, tmp_path):
    from test_multiprocess_stages import caption_run, make_dataset

    dataset = make_dataset(tmp_path / "ds", 4)
    load_script("render_glyphs.py").main(["--dataset_dir", str(dataset), "--mode", "canny"])
    load_script("caption.py").main(caption_run(dataset)[1])
    env = {**slurm_env, "MODEL_DIR": str(tiny_sdxl_dir), "CONTROLNET_DIR": str(tiny_sdxl_dir / "controlnet"),
           "DATA_DIR": str(dataset), "OUTPUT_DIR": str(tmp_path / "out"), "GPUS_PER_NODE": "2",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": "29531", "NUM_WORKERS": "1"}  # fmt: skip
    finished = subprocess.run(["bash", "scripts/slurm/generate.sbatch", "--resolution", "64", "--num_inference_steps",
                               "2"], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(results) == 4 and "process 1 of 2:" in finished.stderr
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [image["id"] for image in report["images"]] == [json.loads(line)["output"] for line in results]
