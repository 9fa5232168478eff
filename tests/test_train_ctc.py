"""train_controlnet_sdxl_ctc.py: the shared trainer plus the OCR text loss, on the tiny pipeline and a glyph dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from repo_scripts import load_script, tiny_training_argv
from safetensors.torch import load_file
from test_recognizer import FONT_PATH

from skingen.errors import SkingenError, run_cli
from skingen.train.loop import build_arg_parser, parse_training_args, train

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
    train(args, on_step=lambda step, values: logs.append(values))
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


def test_held_out_protocol_pairs_the_arms_and_scores_sampled_text_on_unseen_controls(tiny_sdxl_dir, tmp_path,
                                                                                      one_torch_thread, capsys):
    """bench/text_loss_ab.py at its smallest: a built glyph family split into training rows and held-out rows with
    unseen strings, two seeds x two arms from identical starts, held-out controls sampled and scored by
    evaluate.py's metrics, the paired table printed. The tiny random pipeline cannot draw text (the sampled scores
    are those of noise); whether the text loss wins is what the full bench measures (docs/text_loss.md)."""
    bench = load_script("bench/text_loss_ab.py")
    result = bench.main([
        "--family", "light", "--rows", "5", "--heldout_rows", "2", "--base_model", str(tiny_sdxl_dir),
        "--work_dir", str(tmp_path), "--seeds", "0", "1", "--max_train_steps", "6", "--validation_steps", "6",
        "--validation_loss_rows", "1", "--eval_timesteps", "50", "--num_inference_steps", "2",
        "--text_loss_weight", "0.05", "--", "--text_loss_max_timestep", "1000",
    ])
    heldout = [json.loads(line) for line in (tmp_path / "split" / "heldout" / "train.jsonl").read_text().splitlines()]
    train_rows = [json.loads(line) for line in (tmp_path / "split" / "train" / "train.jsonl").read_text().splitlines()]
    assert len(heldout) == 2 and len(train_rows) == 3
    assert not {t for r in heldout for t in r["texts"]} & {t for r in train_rows for t in r["texts"]}
    # The OCR that scores the samples reads the real held-out images (the ceiling is not zero).
    assert result["ceiling"]["images"]["sentence_accuracy"] > 0.5
    records = result["records"]
    assert set(records) == {"seed0_w0", "seed0_w0.05", "seed1_w0", "seed1_w0.05"}
    for seed in (0, 1):
        zero, text = records[f"seed{seed}_w0"], records[f"seed{seed}_w0.05"]
        for key in ("val_loss_diffusion", "val_text_ctc"):  # same weights, same fixed noise before training
            assert zero["curve"][0][key] == text["curve"][0][key]
        assert zero["curve"][6]["val_loss_diffusion"] != text["curve"][6]["val_loss_diffusion"]  # the arms differ
        assert len(zero["readings"]) == sum(len(r["texts"]) for r in heldout)
        assert [target for target, _ in zero["readings"]] == [target for target, _ in text["readings"]]
        assert 0 <= zero["edge_f1"] <= 1 and 0 <= text["sentence_accuracy"] <= 1
    assert len(list((tmp_path / "arms_6steps_lr0.003_text_loss_max_timestep_1000_base" / "seed0_w0" / "heldout_samples").glob("*.png"))) == 2
    table = capsys.readouterr().out
    assert "| 0 |" in table and "| 1 |" in table and "| paired difference (w - 0), in the w column |" in table
    assert set(result["summary"]) == {"sentence_accuracy", "ned", "edge_f1", "val_loss_diffusion", "val_text_ctc"}


def test_held_out_split_drops_training_rows_that_share_a_string_and_marks_text_positions(glyph_dataset, tmp_path):
    bench = load_script("bench/text_loss_ab.py")
    rows = [json.loads(line) for line in (glyph_dataset / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    dataset = tmp_path / "dataset"
    for sub in ("images", "conditioning_images"):
        (dataset / sub).mkdir(parents=True)
    # Row 0 shares its string with the held-out row 2, so only row 1 may train.
    shared = [rows[0], rows[1], {**rows[0], "image": "images/2.png", "conditioning_image": "conditioning_images/2.png"}]
    for index, row in enumerate(shared):
        for key, sub in (("image", "images"), ("conditioning_image", "conditioning_images")):
            source = glyph_dataset / (rows[index % 2][key])
            (dataset / sub / f"{index}.png").write_bytes(source.read_bytes())
        row.update(image=f"images/{index}.png", conditioning_image=f"conditioning_images/{index}.png")
    (dataset / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in shared), encoding="utf-8")

    split = bench.split_dataset(dataset, tmp_path / "split", heldout_rows=1)
    assert (split.train_rows, split.heldout_rows, split.dropped_rows) == (1, 1, 1)
    assert [r["texts"] for r in bench.read_dataset_rows(split.train_dir)] == [rows[1]["texts"]]
    assert not (split.train_dir / "images" / "0.png").is_symlink()  # copies: the trainer refuses outside links

    bench.add_position_channel(split.heldout_dir)
    control = np.asarray(Image.open(split.heldout_dir / "conditioning_images" / "2.png"))
    (x0, y0), (x1, y1) = shared[2]["box"][0][0], shared[2]["box"][0][2]
    inside = control[int(y0) + 1:int(y1) - 1, int(x0) + 1:int(x1) - 1]
    assert inside[..., 2].min() >= 96 and control[0, 0, 2] == 0  # the box is marked in blue, the rest is not
    with pytest.raises(SkingenError, match="hold out 1 .. 2"):
        bench.split_dataset(dataset, tmp_path / "again", heldout_rows=3)
