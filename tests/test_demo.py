"""The main job (README command 1) runs end to end at a reduced size and leaves what it promises."""

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
    proc = subprocess.run(
        ["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
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
