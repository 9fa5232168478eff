"""configs/train presets of the write-up's experiments: each loads through its trainer's argument parser, prepares
its data with a conditioning mode render_glyphs.py has, and has a one-line command in docs/training.md."""

from __future__ import annotations

import re

import pytest
import yaml
from repo_scripts import REPO, load_script

PRESETS = sorted(p for p in (REPO / "configs" / "train").glob("*.yaml") if p.name.startswith(("exp", "stage")))
TEXT_LOSS_PRESETS = {"stage3_exp2_key_elements_332_512_text_loss"}


def test_every_experiment_of_the_write_up_has_a_preset():
    names = {p.stem for p in PRESETS}
    assert {"stage2_exp1_whole_keyboard_50_512_3000", "stage2_exp1_whole_keyboard_50_512_6000"} <= names
    assert len([n for n in names if re.match(r"exp[1-5]_", n)]) == 5  # the five-row table
    assert {"stage3_exp1_key_elements_332_512", "stage3_exp1_key_elements_332_1024"} <= names
    assert TEXT_LOSS_PRESETS <= names


@pytest.fixture(scope="module")
def trainers():
    return {
        "plain": load_script("train_controlnet_sdxl.py"),
        "ctc": load_script("train_controlnet_sdxl_ctc.py"),
    }


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_through_the_trainer_parser(preset, trainers, tmp_path):
    config = yaml.safe_load(preset.read_text(encoding="utf-8"))
    trainer = trainers["ctc" if preset.stem in TEXT_LOSS_PRESETS else "plain"]
    args = trainer.parse_args(["--config", str(preset), "--pretrained_model_name_or_path", str(tmp_path / "sdxl")])
    assert args.pretrained_model_name_or_path == str(tmp_path / "sdxl")  # the command line wins over the file
    for key, value in config.items():
        if key != "pretrained_model_name_or_path":
            assert getattr(args, key) == value, key
    assert args.output_dir == f"outputs/{preset.stem}"
    if preset.stem in TEXT_LOSS_PRESETS:
        assert args.text_loss_weight > 0 and args.validation_loss_timesteps == [50, 150, 250]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_data_comment_prepares_its_dataset_with_a_real_mode(preset):
    render_glyphs = load_script("render_glyphs.py")
    text = preset.read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    data_line = " ".join(line.lstrip("# ").rstrip("\\") for line in text.splitlines() if "OUTPUT_DIR=" in line
                         or "REFERENCE_IMAGE=" in line)
    mode = re.search(r"CONDITIONING=(\S+)", data_line).group(1)
    assert mode in render_glyphs.MODES
    assert f"OUTPUT_DIR={config['train_data_dir']} " in data_line
    layout = re.search(r"LAYOUT=(\S+)", data_line).group(1)
    assert (REPO / "configs" / "layouts" / f"{layout}.yaml").is_file()
    # The write-up's stage 2 runs all shared one control image made from a reference keyboard.
    if preset.stem.startswith(("exp", "stage2")):
        assert mode.startswith("reference") and "REFERENCE_IMAGE=" in data_line
    assert "Not in the write-up" in text  # the choices the write-up does not give are stated


def test_training_docs_have_a_command_for_every_preset():
    readme = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    for preset in PRESETS:
        assert f"--config configs/train/{preset.name}" in readme, preset.name

