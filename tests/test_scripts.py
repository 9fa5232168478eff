"""The shell entry points (README command 1, the data-preparation chain, the launch scripts) run as documented."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_every_stage_and_writes_report(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OUT=str(out), NUM_SKINS="4", TRAIN_STEPS="4", INFERENCE_STEPS="2", RESOLUTION="64")
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in range(1, 10):
        assert f"== {stage}/9" in proc.stdout

    report = (out / "report.md").read_text(encoding="utf-8")
    assert "tiny random-weight SDXL" in report
    assert "| loss_text |" in report and "| edge F1 |" in report

    results = [json.loads(line) for line in (out / "generated" / "results.jsonl").read_text().splitlines()]
    validation_rows = (out / "dataset" / "validation.jsonl").read_text().splitlines()
    assert len(results) == 2 * len(validation_rows) > 0  # two images per held-out layout
    for result in results:
        assert Image.open(out / "generated" / result["output"]).size == (64, 64)
        package = out / "generated" / result["package"]
        assert (package / "bar_candidate.png").is_file() and (package / "key_9_bg.png").is_file()

    metrics = json.loads((out / "generated" / "metrics.json").read_text())["summary"]
    assert metrics["images"] == len(results)
    assert 0.0 <= metrics["edge_f1"] <= 1.0
    assert metrics["text_lines"] > 0
    assert Image.open(out / "demo_grid.png").width > 0
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()


def test_prepare_keyboard_dataset_chain_writes_a_trainable_split_dataset(tmp_path):
    skins, dataset = tmp_path / "skins", tmp_path / "dataset"
    subprocess.run(
        ["python3", "scripts/make_synthetic_skins.py", "--out", str(skins), "--n", "6", "--seed", "1"],
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
        ["python3", "scripts/make_fill50k.py", "--out", str(data), "--n", "4", "--resolution", "64"],
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
