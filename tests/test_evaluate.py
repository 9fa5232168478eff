"""evaluate.py: metrics.json / metrics.md from an inference output folder or a dataset + images folder, and --compare."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from textimages import SKIN_TEXTS, skin_with_texts

import evaluate
from skingen.data.dataset import write_rows
from skingen.errors import SkingenError
from skingen.fileio import write_jsonl
from skingen.prep.glyphs import canny_control

SIZE = (480, 160)


def skin(texts=SKIN_TEXTS, shift: int = 0) -> tuple[Image.Image, list]:
    """A skin with coloured key blocks and the given texts; ``shift`` moves the blocks (not the boxes)."""
    image, quads = skin_with_texts(texts, size=SIZE)
    pixels = np.asarray(image).copy()
    for index in range(3):
        x0 = 10 + index * 150 + shift
        pixels[10:30, x0 : x0 + 120] = (60 + 60 * index, 90, 200 - 50 * index)
        pixels[130:150, x0 : x0 + 120] = (200, 80 + 50 * index, 60)
    return Image.fromarray(pixels), quads


def make_results_dir(folder: Path, *, shift: int = 0, shown=SKIN_TEXTS) -> Path:
    """An inference output folder in the shape inference.py writes: images/, results.jsonl with absolute controls."""
    (folder / "images").mkdir(parents=True)
    (folder.parent / "controls").mkdir(exist_ok=True)
    records = []
    for index in range(2):
        truth, quads = skin()
        control = folder.parent / "controls" / f"{index}.png"
        canny_control(truth).save(control)
        generated, _ = skin(shown, shift=shift)
        output = f"images/{index:04d}_s0.png"
        generated.save(folder / output)
        records.append(
            {
                "row_id": f"images/{index}.png",
                "prompt": 'a keyboard skin of a pink design, iflyskin, writing "前往 搜索 设置"',
                "seed": 0,
                "conditioning_image": str(control),
                "output": output,
                "box": quads,
                "box_size": list(SIZE),
                "texts": SKIN_TEXTS,
            }
        )
    write_jsonl(folder / "results.jsonl", records)
    return folder


def test_results_dir_gets_metrics_json_and_markdown(tmp_path):
    results = make_results_dir(tmp_path / "run")
    evaluate.main(["--results_dir", str(results)])

    report = json.loads((results / "metrics.json").read_text(encoding="utf-8"))
    summary = report["summary"]
    assert (summary["images"], summary["text_lines"]) == (2, 6)
    assert summary["edge_f1"] == 1.0 and summary["sentence_accuracy"] == 1.0 and summary["ned"] == 1.0
    assert summary["clip_score"] is None
    assert [r["id"] for r in report["images"]] == ["images/0000_s0.png", "images/0001_s0.png"]
    assert [line["predicted"] for line in report["images"][0]["lines"]] == SKIN_TEXTS

    markdown = (results / "metrics.md").read_text(encoding="utf-8")
    assert "| edge F1 | 1.0000 |" in markdown and "| sentence accuracy | 1.0000 |" in markdown
    assert "| images/0001_s0.png | 1.0000 | 1.0000 | 1.0000 | - | 前往 / 前往; 搜索 / 搜索; 设置 / 设置 |" in markdown


def test_worse_generations_score_lower_and_compare_shows_the_difference(tmp_path):
    good = make_results_dir(tmp_path / "with_text_loss")
    bad = make_results_dir(tmp_path / "without_text_loss", shift=12, shown=["前进", "搜索", "设定"])
    evaluate.main(["--results_dir", str(good)])
    # The second folder has no metrics.json yet: --compare evaluates it first.
    evaluate.main(["--compare", str(good), str(bad)])

    bad_summary = json.loads((bad / "metrics.json").read_text(encoding="utf-8"))["summary"]
    assert bad_summary["edge_f1"] < 0.95
    assert bad_summary["sentence_accuracy"] == pytest.approx(1 / 3)
    assert bad_summary["ned"] == pytest.approx(2 / 3)

    out = tmp_path / "compare_with_text_loss_vs_without_text_loss"
    comparison = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    by_key = {row["key"]: row for row in comparison["summary"]}
    assert by_key["edge_f1"]["a"] == 1.0 and by_key["edge_f1"]["delta"] < -0.05
    assert by_key["sentence_accuracy"]["delta"] == pytest.approx(1 / 3 - 1)
    assert [row["id"] for row in comparison["images"]] == ["images/0000_s0.png", "images/0001_s0.png"]
    markdown = (out / "comparison.md").read_text(encoding="utf-8")
    assert f"A = `with_text_loss` ({good}), B = `without_text_loss` ({bad})" in markdown
    assert "| sentence accuracy | 1.0000 | 0.3333 | -0.6667 |" in markdown

    # Evaluated folders compare from their metrics.json alone.
    shutil.rmtree(good / "images")
    evaluate.main(["--compare", str(good), str(bad), "--output_dir", str(tmp_path / "cmp")])
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text(encoding="utf-8")) == comparison


def test_dataset_and_images_dir_pairing_scales_boxes(tmp_path):
    dataset, generated = tmp_path / "ds", tmp_path / "generated"
    (dataset / "images").mkdir(parents=True)
    (dataset / "conditioning_images").mkdir()
    generated.mkdir()
    rows = []
    for index in range(3):
        image, quads = skin()
        image.save(dataset / "images" / f"{index}.png")
        canny_control(image).save(dataset / "conditioning_images" / f"{index}.png")
        rows.append(
            {
                "image": f"images/{index}.png",
                "conditioning_image": f"conditioning_images/{index}.png",
                "text": "a skin, iflyskin",
                "box": quads,
                "texts": SKIN_TEXTS,
            }
        )
    write_rows(dataset, rows)
    # Generated at twice the dataset's size: the text metrics must scale the boxes to find the text.
    for index in range(2):
        skin_big = skin()[0].resize((SIZE[0] * 2, SIZE[1] * 2), Image.Resampling.LANCZOS)
        skin_big.save(generated / f"{index}.png")

    evaluate.main(["--dataset_dir", str(dataset), "--images_dir", str(generated)])
    report = json.loads((generated / "metrics.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in report["images"]] == ["images/0.png", "images/1.png"]
    assert report["summary"]["sentence_accuracy"] == 1.0
    assert report["summary"]["edge_f1"] > 0.9


def test_ocr_backend_none_skips_text_metrics(tmp_path):
    results = make_results_dir(tmp_path / "run")
    evaluate.main(["--results_dir", str(results), "--ocr_backend", "none", "--output_dir", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))["summary"]
    assert summary["edge_f1"] == 1.0
    assert summary["text_lines"] == 0 and summary["sentence_accuracy"] is None
    assert not (results / "metrics.json").exists()


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(SkingenError, match="results.jsonl: not found"):
        evaluate.main(["--results_dir", str(tmp_path)])
    with pytest.raises(SkingenError, match="exactly one of"):
        evaluate.main(["--results_dir", str(tmp_path), "--compare", "a", "b"])
    with pytest.raises(SkingenError, match="go together"):
        evaluate.main(["--dataset_dir", str(tmp_path)])

    results = make_results_dir(tmp_path / "run")
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    rows[1]["output"] = "images/missing.png"
    write_jsonl(results / "results.jsonl", rows)
    with pytest.raises(SkingenError, match=r"results.jsonl:2: 'output' file 'images/missing.png' not found"):
        evaluate.main(["--results_dir", str(results)])
    rows[1]["output"] = "images/0001_s0.png"
    rows[0]["texts"] = ["前往"]
    write_jsonl(results / "results.jsonl", rows)
    with pytest.raises(SkingenError, match=r"results.jsonl:1: 'texts' has 1 entries but 'box' has 3"):
        evaluate.main(["--results_dir", str(results)])
    with pytest.raises(SkingenError, match="neither metrics.json nor results.jsonl"):
        evaluate.main(["--compare", str(tmp_path / "nothing"), str(results)])


def test_evaluates_what_inference_py_writes(tmp_path, tiny_sdxl_dir):
    """The results.jsonl contract end to end: a tiny SDXL ControlNet run, then evaluate.py on its folder."""
    import inference

    dataset = tmp_path / "ds"
    (dataset / "images").mkdir(parents=True)
    (dataset / "conditioning_images").mkdir()
    image, quads = skin()
    image.save(dataset / "images" / "0.png")
    canny_control(image).save(dataset / "conditioning_images" / "0.png")
    write_rows(
        dataset,
        [
            {
                "image": "images/0.png",
                "conditioning_image": "conditioning_images/0.png",
                "text": "a skin",
                "box": quads,
                "texts": SKIN_TEXTS,
            }
        ],
    )
    out = tmp_path / "generated"
    inference.main(
        [
            "--pretrained_model_name_or_path", str(tiny_sdxl_dir),
            "--controlnet", str(tiny_sdxl_dir / "controlnet"),
            "--dataset_dir", str(dataset),
            "--output_dir", str(out),
            "--num_inference_steps", "1",
            "--resolution", "64",
        ]
    )  # fmt: skip
    evaluate.main(["--results_dir", str(out)])
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    (record,) = report["images"]
    assert (out / record["id"]).is_file() and record["control"] == str(dataset / "conditioning_images" / "0.png")
    assert 0.0 <= record["edge_f1"] <= 1.0
    assert [line["target"] for line in record["lines"]] == SKIN_TEXTS
    assert report["summary"]["text_lines"] == 3
