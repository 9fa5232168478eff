"""The shell entry points (the data-preparation chain, the launch scripts) run as documented; the demo's are in
test_demo.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_prepare_keyboard_dataset_chain_writes_a_trainable_split_dataset(tmp_path):
    skins, dataset = tmp_path / "skins", tmp_path / "dataset"
    subprocess.run(
        [sys.executable, "scripts/make_synthetic_skins.py", "--out", str(skins), "--n", "6", "--seed", "1"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    env = dict(
        os.environ, PACKAGES_DIR=str(skins), OUTPUT_DIR=str(dataset), CONDITIONING="template", VAL_FRACTION="0.5"
    )
    proc = subprocess.run(
        ["bash", "scripts/prepare_keyboard_dataset.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = (dataset / "train.jsonl").read_text().splitlines()
    validation = (dataset / "validation.jsonl").read_text().splitlines()
    assert len(train) + len(validation) == len((dataset / "train.unfiltered.jsonl").read_text().splitlines()) == 6
    rows = [json.loads(line) for line in train + validation]
    assert all(row["text"].endswith("iflyskin") for row in rows)
    assert {row["conditioning_image"] for row in rows} == {"conditioning_images/template.png"}
    assert (dataset / "filter_report.md").is_file()


def test_launch_scripts_train_through_accelerate(tiny_sdxl_dir, tmp_path):
    data = tmp_path / "fill50k"
    subprocess.run(
        [sys.executable, "scripts/make_fill50k.py", "--out", str(data), "--n", "4", "--resolution", "64"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    for script, output in (("scripts/train.sh", tmp_path / "plain"), ("scripts/train_ctc.sh", tmp_path / "ctc")):
        env = dict(
            os.environ,
            MODEL_DIR=str(tiny_sdxl_dir),
            DATA_DIR=str(data),
            OUTPUT_DIR=str(output),
            RESOLUTION="64",
            MAX_STEPS="2",
            BATCH_SIZE="2",
            MIXED_PRECISION="no",
        )
        proc = subprocess.run(
            ["bash", script, "--report_to", "none"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (output / "diffusion_pytorch_model.safetensors").is_file()
    assert "with the text loss" in proc.stdout
    # train_ctc.sh follows the text loss at fixed timesteps by default: before training and at the end.
    assert "step 0: losses at fixed timesteps [50, 150, 250]" in proc.stderr
    assert "step 2: losses at fixed timesteps [50, 150, 250]: val_loss_diffusion" in proc.stderr
