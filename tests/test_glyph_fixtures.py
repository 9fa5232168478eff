"""skingen.testing.glyph_fixtures: the two glyph dataset families the text-loss protocol tunes on and confirms on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from skingen.errors import SkingenError
from skingen.evaluate.metrics import text_metrics
from skingen.prep.ocr import get_ocr
from skingen.testing.glyph_fixtures import FAMILIES, write_glyph_family
from skingen.train.text_loss import quad_size


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: write_glyph_family(root / name, name, rows=6, heldout_rows=2, seed=1) for name in FAMILIES}


def rows_of(folder):
    return [json.loads(line) for line in (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()]


def label_heights(rows):
    import torch

    return [float(h) for row in rows for h in quad_size(torch.tensor(row["box"], dtype=torch.float32))[1]]


def test_held_out_rows_use_only_strings_the_training_rows_never_show(families):
    for name, folder in families.items():
        rows = rows_of(folder)
        train = {t for row in rows[:-2] for t in row["texts"]}
        heldout = {t for row in rows[-2:] for t in row["texts"]}
        assert heldout and not train & heldout, name
        for row in rows:
            assert len(row["box"]) == len(row["texts"]) >= 4  # several labels per image
            assert all(f'writing "{t}"' in row["text"] for t in row["texts"])
            control = np.asarray(Image.open(folder / row["conditioning_image"]))
            assert control.max() > 200  # the glyphs are drawn into the control (white on black)


def test_families_differ_in_contrast_fonts_sizes_scripts_and_orientation(families):
    light, dark = (rows_of(families[name]) for name in ("light", "dark"))
    for rows in (light, dark):
        texts = [t for row in rows for t in row["texts"]]
        assert any(t.isascii() for t in texts) and any(not t.isascii() for t in texts)  # Latin and CJK
        heights = label_heights(rows)
        assert min(heights) < 16 and max(heights) > 22  # small key labels next to large ones
        assert len({round(h) for h in heights}) >= 3

    def ink_vs_key(folder, rows):  # mean brightness inside the boxes vs the whole image
        image = np.asarray(Image.open(folder / rows[0]["image"]).convert("L"), dtype=np.float32)
        return image.mean()

    assert ink_vs_key(families["light"], light) > ink_vs_key(families["dark"], dark)  # light keys vs dark keys
    # Only the dark family has vertical labels: a box whose reading direction points down the image.
    def vertical(rows):
        return sum(abs(b[1][1] - b[0][1]) > abs(b[1][0] - b[0][0]) for row in rows for b in row["box"])

    assert vertical(dark) >= len(dark) and vertical(light) == 0


def test_the_ocr_that_scores_samples_reads_the_families_own_images(families):
    """The held-out score is only meaningful if evaluate.py's OCR reads the real images: most labels, per family."""
    ocr = get_ocr("rapidocr")
    for name, folder in families.items():
        lines = []
        for row in rows_of(folder):
            image = Image.open(folder / row["image"])
            lines += text_metrics(image, row["box"], row["texts"], ocr).lines
        accuracy = np.mean([line.correct for line in lines])
        assert accuracy > 0.6, (name, [(line.target, line.predicted) for line in lines if not line.correct])


def test_bad_family_arguments_are_user_errors(tmp_path):
    with pytest.raises(SkingenError, match="choose one of light, dark"):
        write_glyph_family(tmp_path / "x", "neon")
    with pytest.raises(SkingenError, match="heldout_rows must be between 1 and rows - 1"):
        write_glyph_family(tmp_path / "y", "light", rows=3, heldout_rows=3)
