"""Validation grids and model cards of SD3 and FLUX ControlNet training; scripts/train_ctc.sh with BACKBONE=."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageDraw
from repo_scripts import REPO, load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    """Four 64 px rows with one text box each (texts from writing "..." in the caption)."""
    folder = tmp_path_factory.mktemp("text_dataset")
    (folder / "images").mkdir()
    (folder / "conditioning_images").mkdir()
    rows = []
    for index in range(4):
        image = Image.new("RGB", (64, 64), (30 * index, 90, 180))
        ImageDraw.Draw(image).text((6, 20), f"AB{index}", fill=(255, 255, 255))
        image.save(folder / "images" / f"{index}.png")
        control = Image.new("RGB", (64, 64))
        ImageDraw.Draw(control).rectangle([4, 18, 40, 34], outline=(255, 255, 255))
        control.save(folder / "conditioning_images" / f"{index}.png")
        rows.append({
            "image": f"images/{index}.png", "conditioning_image": f"conditioning_images/{index}.png",
            "text": f'a keyboard skin, writing "AB{index}"', "box": [[[4, 18], [40, 18], [40, 34], [4, 34]]],
        })  # fmt: skip
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return folder


@pytest.mark.parametrize("backbone", ["sd3", "flux"])
def test_training_writes_validation_grids_and_a_family_model_card(
    backbone, tiny_sd3_dir, tiny_flux_dir, text_dataset, tmp_path, fresh_accelerate_state
):
    base = {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}[backbone]
    trainer = load_script(f"train_controlnet_{backbone}.py")
    control = text_dataset / "conditioning_images" / "0.png"
    trainer.main([
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(text_dataset),
        "--output_dir", str(tmp_path), "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "1",
        "--validation_steps", "1", "--validation_prompt", "a keyboard skin", "a blue keyboard skin",
        "--validation_image", str(control), "--num_validation_images", "2", "--validation_inference_steps", "2",
        "--report_to", "none", "--seed", "0",
    ])  # fmt: skip
    grid = np.asarray(Image.open(tmp_path / "validation" / "step-1.png").convert("RGB"))
    assert grid.shape == (2 * 64, 3 * 64, 3)  # a row per prompt: the control image, then 2 samples
    samples = grid[:, 64:].astype(np.int16)
    assert samples.std() > 5  # generated pixels, not an empty canvas
    assert np.abs(samples[:, :64] - samples[:, 64:]).mean() > 0.5  # seed + k: the samples of a row differ
    card = (tmp_path / "README.md").read_text()
    family_classes = {
        "sd3": ("SD3ControlNetModel", "StableDiffusion3ControlNetPipeline"),
        "flux": ("FluxControlNetModel", "FluxControlNetPipeline"),
    }[backbone]
    assert all(name in card for name in family_classes) and "StableDiffusionXL" not in card
    assert f"train_controlnet_{backbone}.py" in card


def test_train_ctc_script_runs_the_flux_trainer_with_the_text_loss(tiny_flux_dir, text_dataset, tmp_path):
    env = dict(
        os.environ, BACKBONE="flux", MODEL_DIR=str(tiny_flux_dir), DATA_DIR=str(text_dataset),
        OUTPUT_DIR=str(tmp_path / "out"), RESOLUTION="64", MAX_STEPS="1", BATCH_SIZE="2", MIXED_PRECISION="no",
        VALIDATION_LOSS_TIMESTEPS="150", OMP_NUM_THREADS="1",
    )  # fmt: skip
    proc = subprocess.run(
        ["bash", "scripts/train_ctc.sh", "--report_to", "none"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["_class_name"] == "FluxControlNetModel"
    assert "val_text_ctc" in proc.stderr  # the text loss is on: its fixed-timestep value is logged

    env["BACKBONE"] = "sd2"
    proc = subprocess.run(["bash", "scripts/train.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "BACKBONE=sd2: choose sdxl, sd3, flux, zimage or qwenimage" in proc.stderr
