"""train_controlnet_sdxl_ctc.py: the shared trainer plus the OCR text loss, on the tiny pipeline and a glyph dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from repo_scripts import load_script, tiny_training_argv
from safetensors.torch import load_file
from test_recognizer import FONT_PATH

from skingen.errors import run_cli
from skingen.training import build_arg_parser, parse_training_args, train

WEIGHTS = "diffusion_pytorch_model.safetensors"


script = load_script("train_controlnet_sdxl_ctc.py")


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def glyph_dataset(tmp_path_factory) -> Path:
    """Two 64 px rows: a word drawn on a coloured background, its glyph image as control, box + texts."""
    root = tmp_path_factory.mktemp("glyphs")
    (root / "images").mkdir()
    (root / "conditioning_images").mkdir()
    font = ImageFont.truetype(FONT_PATH, 24)
    rows = []
    for i, (word, background) in enumerate([("前往", (230, 200, 120)), ("搜索", (120, 180, 230))]):
        left, top, right, bottom = font.getbbox(word)
        x0, y0 = (64 - (right - left)) // 2, (64 - (bottom - top)) // 2
        image, control = Image.new("RGB", (64, 64), background), Image.new("RGB", (64, 64))
        ImageDraw.Draw(image).text((x0 - left, y0 - top), word, font=font, fill=(30, 30, 60))
        ImageDraw.Draw(control).text((x0 - left, y0 - top), word, font=font, fill=(255, 255, 255))
        image.save(root / "images" / f"{i}.png")
        control.save(root / "conditioning_images" / f"{i}.png")
        x1, y1 = x0 + right - left, y0 + bottom - top
        rows.append({
            "text": f'a keyboard skin, iflyskin, writing "{word}"',
            "image": f"images/{i}.png",
            "conditioning_image": f"conditioning_images/{i}.png",
            "box": [[[x0 - 3, y0 - 3], [x1 + 3, y0 - 3], [x1 + 3, y1 + 3], [x0 - 3, y1 + 3]]],
            "texts": [word],
        })
    (root / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return root


_argv = tiny_training_argv


def _train_with_text_loss(argv):
    args = script.parse_args(argv)
    logs = []
    train(args, extra_loss=script.build_text_loss(args), on_step=lambda step, values: logs.append(values))
    return logs


def test_text_loss_trains_the_controlnet_and_weight_zero_equals_the_plain_trainer(tiny_sdxl_dir, glyph_dataset, tmp_path):
    # Every timestep takes part, so the first step already has text rows.
    common = ["--max_train_steps", 2, "--text_loss_max_timestep", 1000]
    logs = _train_with_text_loss(_argv(tiny_sdxl_dir, glyph_dataset, tmp_path / "text", *common, "--text_loss_weight", 1))
    assert logs[0]["boxes_used"] == 2 and logs[0]["unknown_chars"] == 0
    assert logs[0]["text_ctc"] > 1.0  # the untrained model draws no readable text
    assert logs[0]["loss_text"] > 0 and logs[0]["loss"] == pytest.approx(logs[0]["loss_diffusion"] + logs[0]["loss_text"])

    zero_logs = _train_with_text_loss(_argv(tiny_sdxl_dir, glyph_dataset, tmp_path / "zero", *common, "--text_loss_weight", 0))
    train(parse_training_args(build_arg_parser(), _argv(tiny_sdxl_dir, glyph_dataset, tmp_path / "plain", "--max_train_steps", 2)))

    text, zero, plain = (load_file(tmp_path / name / WEIGHTS) for name in ("text", "zero", "plain"))
    # The text loss's gradient reaches the trained weights through the real loop ...
    assert max((text[k] - zero[k]).abs().max().item() for k in text) > 1e-4
    # ... and at weight 0 it changes nothing else: same data, same randomness, bit-identical ControlNet.
    assert all(torch.equal(zero[k], plain[k]) for k in plain)
    assert zero_logs[0]["loss_text"] == 0.0
    assert zero_logs[0]["loss_diffusion"] == logs[0]["loss_diffusion"]  # same first batch, same starting weights


def test_command_line_run_writes_the_controlnet(tiny_sdxl_dir, glyph_dataset, tmp_path, capsys):
    from diffusers import ControlNetModel

    out = tmp_path / "cli"
    run_cli(script.main, _argv(tiny_sdxl_dir, glyph_dataset, out, "--max_train_steps", 1, "--text_loss_type", "both"))
    assert "trained 1 steps with the text loss" in capsys.readouterr().out
    ControlNetModel.from_pretrained(out)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--text_loss_weight", "-1"], "--text_loss_weight must not be negative"),
        (["--recognizer_model_path", "missing.onnx"], "missing.onnx: recognizer model not found"),
        (["--text_loss_type", "l2"], "invalid choice: 'l2'"),
    ],
)
def test_bad_text_loss_flags_exit_2_with_a_clear_message(tiny_sdxl_dir, glyph_dataset, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, _argv(tiny_sdxl_dir, glyph_dataset, tmp_path / "bad", "--max_train_steps", 1, *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_text_loss_falls_during_training_without_harming_the_diffusion_loss(tmp_path, one_torch_thread):
    """Evidence for the text loss in a real training run (bench/text_loss_ab.py at a small size).

    A random tiny VAE decodes noise, so the pipeline's VAE is first fitted to reconstruct the glyph dataset; the
    recognizer must read every label in its reconstructions (the ceiling training can reach). The curves are the
    fixed-timestep validation loss (fixed noise, t in {50, 150, 250}): no sampling noise between evaluations.
    Seeds 0-4 of this setting all pass; whether the text loss beats the run without it is measured over seeds
    by the bench (docs/text_loss.md), not asserted here.
    """
    bench = load_script("bench/text_loss_ab.py")
    dataset = bench.write_glyph_dataset(tmp_path / "dataset", rows=4, resolution=128, keys_per_row=3, font_size=24)
    fit = bench.build_fitted_pipeline(tmp_path / "pipeline", dataset, resolution=128, vae_fit_steps=500)
    assert fit["labels_read_in_reconstructions"] == fit["labels"] == 12

    common = {"seed": 0, "max_train_steps": 200, "validation_steps": 50, "resolution": 128, "learning_rate": 3e-3,
              "eval_timesteps": [50, 150, 250], "trainer_flags": []}
    zero = bench.run_arm(tmp_path / "pipeline", dataset, tmp_path / "zero", text_loss_weight=0.0, **common)["curve"]
    text = bench.run_arm(tmp_path / "pipeline", dataset, tmp_path / "text", text_loss_weight=0.05, **common)["curve"]

    assert sorted(text) == [0, 50, 100, 150, 200]
    # The text becomes readable: the recognizer's CTC on the one-step x0 estimate falls by more than half ...
    assert text[200]["val_text_ctc"] < 0.5 * text[0]["val_text_ctc"]
    # ... while the diffusion loss falls too, and ends within 10% of the run without the text loss.
    assert text[200]["val_loss_diffusion"] < 0.7 * text[0]["val_loss_diffusion"]
    assert text[200]["val_loss_diffusion"] < 1.1 * zero[200]["val_loss_diffusion"]
    # Same start (same weights, same fixed noise) and a real difference in training between the arms.
    assert all(zero[0][key] == text[0][key] for key in ("val_text_ctc", "val_loss_diffusion"))
    assert text[200]["val_loss_diffusion"] != zero[200]["val_loss_diffusion"]
