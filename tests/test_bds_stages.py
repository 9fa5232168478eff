"""A package keyboard dataset (exact boxes and strings) through the later stages: render_glyphs' glyph mode draws
the exact strings without OCR, evaluate.py scores generated keyboards against them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from repo_scripts import load_script

import evaluate
import merge_elements
import render_glyphs
from skingen.data.dataset import read_rows


@pytest.fixture(scope="module")
def keyboards(tmp_path_factory):
    out = tmp_path_factory.mktemp("bdss")
    load_script("scripts/make_synthetic_skins.py").main(["--out", str(out / "skins"), "--n", "2", "--format", "bds"])
    merge_elements.main(["--packages_dir", str(out / "skins"), "--layout", "package", "--keyboard", "py_9",
                         "--resolution", "360", "--output_dir", str(out / "ds")])  # fmt: skip
    return out / "ds"


def test_glyph_mode_draws_the_exact_strings_without_ocr(keyboards, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("OCR must not run on rows with exact labels")

    monkeypatch.setattr(render_glyphs, "get_ocr", must_not_run)
    before = read_rows(keyboards)
    render_glyphs.main(["--dataset_dir", str(keyboards), "--mode", "glyph"])
    after = read_rows(keyboards)
    for old, new in zip(before, after):
        assert new["box"] == old["box"] and new["texts"] == old["texts"]  # kept, not replaced by OCR's
        control = np.asarray(Image.open(keyboards / new["conditioning_image"]).convert("L"))
        x0, y0 = (round(v) for v in new["box"][new["texts"].index("WXYZ")][0])
        x1, y1 = (round(v) for v in new["box"][new["texts"].index("WXYZ")][2])
        inside = control[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3]
        assert (inside > 127).mean() > 0.05  # the string is drawn in its key (not only the key's outline)
        icon = new["box"][0]  # a bar icon: an outline, no string
        ix0, iy0, ix1, iy1 = round(icon[0][0]), round(icon[0][1]), round(icon[2][0]), round(icon[2][1])
        assert (control[iy0 + 3 : iy1 - 3, ix0 + 3 : ix1 - 3] > 127).mean() == 0


def test_evaluate_scores_generated_keyboards_against_the_exact_labels(keyboards, tmp_path):
    rows = read_rows(keyboards)
    good, blank = tmp_path / "good", tmp_path / "blank"
    good.mkdir(), blank.mkdir()
    for row in rows:
        image = Image.open(keyboards / row["image"]).convert("RGB")
        image.save(good / f"{row['package']}.png")
        Image.new("RGB", image.size, (128, 128, 128)).save(blank / f"{row['package']}.png")
    for folder in (good, blank):
        evaluate.main(["--dataset_dir", str(keyboards), "--images_dir", str(folder)])
    scores = {f.name: json.loads((f / "metrics.json").read_text(encoding="utf-8")) for f in (good, blank)}
    labelled = sum(1 for row in rows for text in row["texts"] if text)
    assert labelled < sum(len(row["texts"]) for row in rows)
    assert scores["good"]["summary"]["text_lines"] == labelled  # only boxes with a string are scored
    assert scores["good"]["summary"]["sentence_accuracy"] >= 0.5
    assert scores["blank"]["summary"]["sentence_accuracy"] == 0.0
