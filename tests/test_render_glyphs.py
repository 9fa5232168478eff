"""render_glyphs.py on tiny dataset folders: canny, template and glyph modes, resume, and user errors."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw
from textimages import draw_texts, iou

import render_glyphs
from skingen.data import dataset as data
from skingen.errors import SkingenError
from skingen.fileio import atomic_write_json
from skingen.prep.ocr import get_ocr
from skingen.skins.layout import load_layout, render_template

SIZE = 512
LAYOUT_YAML = """
name: test_bar_and_keys
canvas: [512, 512]
resolutions: [512, 1024]
background: [255, 255, 255]
elements:
  - {id: candidate_bar, box: [0, 0, 512, 96], patterns: ["bar*.png"]}
  - {id: key_a, box: [16, 300, 240, 400], patterns: ["key_a*.png"]}
  - {id: key_b, box: [272, 300, 496, 400], patterns: ["key_b*.png"]}
"""
# What each test skin shows: (top-left, string, colour). Skin 2 has no text at all.
SKIN_TEXTS = [
    [((40, 30), "前往", (255, 255, 255)), ((300, 30), "搜索", (250, 220, 0)), ((60, 330), "Hello", (20, 20, 20))],
    [((320, 335), "设置", (30, 30, 30))],
    [],
]


def draw_skin(index: int) -> tuple[Image.Image, dict]:
    rng = np.random.default_rng(index)
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(40, 120, 3)))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 511, 95), fill=(30, 60, 110))
    for box in ((16, 300, 239, 399), (272, 300, 495, 399)):
        draw.rounded_rectangle(box, 14, fill=(235, 235, 240))
    return image, draw_texts(image, SKIN_TEXTS[index] if index < len(SKIN_TEXTS) else [], font_size=34)


@pytest.fixture
def dataset(tmp_path):
    """A dataset folder as merge_elements.py leaves it: images/, train.jsonl and, with ``record="json"``,
    layout.json (the resolved spec) plus the layout's name in each row; ``"name"``: only a name in the
    rows (key_elements, from configs/layouts); ``None``: no layout recorded."""

    def make(count=3, record="json"):
        root = tmp_path / "ds"
        (root / "images").mkdir(parents=True)
        layout_path = tmp_path / "test_layout.yaml"
        layout_path.write_text(LAYOUT_YAML, encoding="utf-8")
        if record == "json":
            atomic_write_json(root / "layout.json", load_layout(layout_path, resolution=SIZE).to_dict())
        rows, inks = [], []
        for i in range(count):
            image, ink = draw_skin(i)
            image.save(root / "images" / f"skin_{i}.png")
            inks.append(ink)
            row = {"image": f"images/skin_{i}.png", "package": f"skin_{i}", "text": "", "custom": {"keep": i}}
            if record is not None:
                row["layout"] = "test_bar_and_keys" if record == "json" else "key_elements"
            rows.append(row)
        data.write_rows(root, rows)
        return root, layout_path, inks

    return make


def run(root, *flags):
    render_glyphs.main(["--dataset_dir", str(root), *flags])
    return data.read_rows(root)


def temp_files(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_canny_mode_is_cv2_canny_and_keeps_other_fields(dataset):
    root, layout_path, _ = dataset(count=2)
    rows = run(root, "--mode", "canny")
    for i, row in enumerate(rows):
        assert row["conditioning_image"] == f"conditioning_images/skin_{i}.png"
        assert row["package"] == f"skin_{i}" and row["custom"] == {"keep": i} and row["layout"] == "test_bar_and_keys"
        control = np.asarray(Image.open(root / row["conditioning_image"]))
        expected = cv2.Canny(cv2.imread(str(root / row["image"])), 50, 80)
        assert control.shape == (SIZE, SIZE, 3)
        for channel in range(3):
            np.testing.assert_array_equal(control[..., channel], expected)


def test_template_mode_writes_one_shared_image(dataset):
    root, layout_path, _ = dataset(count=3)
    rows = run(root, "--mode", "template")
    assert {row["conditioning_image"] for row in rows} == {"conditioning_images/template.png"}
    assert sorted(p.name for p in (root / "conditioning_images").glob("*.png")) == ["template.png"]
    expected = render_template(load_layout(layout_path, resolution=SIZE))
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / "conditioning_images/template.png")), np.asarray(expected)
    )
    assert [row["custom"] for row in rows] == [{"keep": i} for i in range(3)]


def test_glyph_mode_finds_the_drawn_text_and_redraws_it(dataset, capsys):
    root, layout_path, inks = dataset(count=3)
    rows = run(root, "--mode", "glyph", "--batch_size", "2")
    template = np.asarray(render_template(load_layout(layout_path, resolution=SIZE)))
    reader = get_ocr("rapidocr", num_threads=2)
    for row, ink in zip(rows, inks):
        assert sorted(row["texts"]) == sorted(ink)
        assert len(row["box"]) == len(row["texts"])
        for quad, text in zip(row["box"], row["texts"]):
            assert all(isinstance(v, float) for point in quad for v in point) and len(quad) == 4
            assert iou(quad, ink[text]) > 0.5, (text, quad, ink[text])
        control = np.asarray(Image.open(root / row["conditioning_image"]))
        # The layout's outlines are all there, and the redrawn text reads back as the same strings.
        assert (control[template > 0] == 255).all()
        assert sorted(line.text for line in reader.read(control)) == sorted(ink)
    assert rows[2]["box"] == [] and rows[2]["texts"] == []
    out = capsys.readouterr().out
    assert "text lines found 4, kept 4" in out and "rows with no kept text: 1" in out

    # A bar nothing clears: every line found is dropped, every row ends up without text.
    rows = run(root, "--mode", "glyph", "--overwrite", "--min_confidence", "1.01")
    assert all(row["texts"] == [] and row["box"] == [] for row in rows)
    np.testing.assert_array_equal(np.asarray(Image.open(root / rows[0]["conditioning_image"])), template)
    assert "kept 0" in capsys.readouterr().out


def test_second_run_does_no_work(dataset, monkeypatch):
    root, _, _ = dataset(count=2)
    run(root, "--mode", "glyph")
    run(root, "--mode", "canny")  # switch modes: canny images replace the glyph ones
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished dataset was processed again")

    monkeypatch.setattr(render_glyphs, "canny_control", must_not_run)
    rows = run(root, "--mode", "canny")
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    # The glyph run's box/texts stay on the rows; canny mode does not touch them.
    assert rows[0]["texts"] and rows[0]["conditioning_image"] == "conditioning_images/skin_0.png"


def test_changed_settings_redo_the_images(dataset, monkeypatch):
    root, _, _ = dataset(count=2)
    run(root, "--mode", "glyph")
    run(root, "--mode", "canny", "--low_threshold", "10", "--high_threshold", "20")
    rows = run(root, "--mode", "canny")  # other thresholds: every image is made again
    for row in rows:
        expected = cv2.Canny(cv2.imread(str(root / row["image"])), 50, 80)
        np.testing.assert_array_equal(np.asarray(Image.open(root / row["conditioning_image"]))[..., 0], expected)
    # Back to glyph mode: the canny images at the same paths must not pass for glyph images.
    glyph_calls = []
    real_render = render_glyphs.render_glyph_control

    def counting_render(*args, **kwargs):
        glyph_calls.append(1)
        return real_render(*args, **kwargs)

    monkeypatch.setattr(render_glyphs, "render_glyph_control", counting_render)
    run(root, "--mode", "glyph")
    assert len(glyph_calls) == 2


def test_interrupted_run_leaves_no_partial_files_and_resumes(dataset, monkeypatch):
    root, _, _ = dataset(count=5)
    real_canny = render_glyphs.canny_control
    calls = []

    def canny_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_canny(*args, **kwargs)

    monkeypatch.setattr(render_glyphs, "canny_control", canny_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(root, "--mode", "canny", "--batch_size", "2")
    assert temp_files(root) == []
    rows = data.read_rows(root)
    assert [("conditioning_image" in row) for row in rows] == [True, True, False, False, False]
    for row in rows[:2]:
        Image.open(root / row["conditioning_image"]).verify()

    calls.clear()
    rows = run(root, "--mode", "canny", "--batch_size", "2")
    assert len(calls) == 3  # only the rows the first run did not record
    for row in rows:
        expected = cv2.Canny(cv2.imread(str(root / row["image"])), 50, 80)
        np.testing.assert_array_equal(np.asarray(Image.open(root / row["conditioning_image"]))[..., 0], expected)
    assert temp_files(root) == []


def test_missing_image_names_the_row(dataset):
    root, _, _ = dataset(count=2)
    rows = data.read_rows(root)
    rows[1]["image"] = "images/gone.png"
    data.write_rows(root, rows)
    with pytest.raises(SkingenError, match=r"train.jsonl:2: 'image' file 'images/gone.png' not found"):
        run(root, "--mode", "canny")
    rows[0]["image"] = "../outside.png"
    data.write_rows(root, rows)
    with pytest.raises(SkingenError) as info:
        run(root, "--mode", "canny")
    assert "train.jsonl:1: 'image' path '../outside.png' leaves the dataset folder" in str(info.value)
    assert "train.jsonl:2: 'image' file 'images/gone.png' not found" in str(info.value)  # every problem at once


def test_missing_font_is_clear(dataset):
    root, _, _ = dataset(count=1)
    with pytest.raises(SkingenError, match=r"--font .*no_such_font.ttf: file not found.*fonts-wqy-microhei"):
        run(root, "--mode", "glyph", "--font", str(root / "no_such_font.ttf"))


def test_layout_comes_from_the_rows_name_when_there_is_no_layout_json(dataset):
    root, _, _ = dataset(count=2, record="name")
    rows = run(root, "--mode", "template")
    assert {row["conditioning_image"] for row in rows} == {"conditioning_images/template.png"}
    expected = render_template(load_layout("key_elements", resolution=SIZE))
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / "conditioning_images/template.png")), np.asarray(expected)
    )


def test_template_is_drawn_from_layout_json_whatever_happened_to_the_yaml(dataset):
    """layout.json holds the boxes the images were merged with: an edited or moved YAML does not matter."""
    root, layout_path, _ = dataset(count=1)
    merged_with = np.asarray(render_template(load_layout(layout_path, resolution=SIZE)))
    layout_path.write_text(LAYOUT_YAML.replace("[16, 300, 240, 400]", "[16, 280, 240, 400]"), encoding="utf-8")
    run(root, "--mode", "template")
    np.testing.assert_array_equal(np.asarray(Image.open(root / "conditioning_images/template.png")), merged_with)
    layout_path.unlink()
    run(root, "--mode", "template", "--overwrite")
    np.testing.assert_array_equal(np.asarray(Image.open(root / "conditioning_images/template.png")), merged_with)

    with pytest.raises(SkingenError, match=r"layout.json: this record holds layout 'test_bar_and_keys' at 512 px only"):
        run(root, "--mode", "template", "--resolution", "1024")
    (root / "layout.json").write_text('{"name": "test_bar_and_keys", "width": 512}', encoding="utf-8")
    with pytest.raises(SkingenError, match=r"layout.json: not a layout record \(missing \['elements', 'height'\]\)"):
        run(root, "--mode", "template")


def test_an_edited_layout_redraws_the_template(dataset):
    root, layout_path, _ = dataset(count=1, record=None)
    run(root, "--mode", "template", "--layout", str(layout_path))
    layout_path.write_text(LAYOUT_YAML.replace("[16, 300, 240, 400]", "[16, 280, 240, 400]"), encoding="utf-8")
    run(root, "--mode", "template", "--layout", str(layout_path))
    expected = render_template(load_layout(layout_path, resolution=SIZE))
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / "conditioning_images/template.png")), np.asarray(expected)
    )


def test_layout_must_be_known_and_match_the_images(dataset):
    root, layout_path, _ = dataset(count=1, record=None)
    with pytest.raises(SkingenError, match="no layout recorded.*pass --layout"):
        run(root, "--mode", "template")
    with pytest.raises(SkingenError, match=r"images/skin_0.png is 512x512 but the layout template is 1024x1024"):
        run(root, "--mode", "glyph", "--layout", str(layout_path), "--resolution", "1024")
    rows = run(root, "--mode", "template", "--layout", str(layout_path))
    assert rows[0]["conditioning_image"] == "conditioning_images/template.png"


def test_config_file_sets_flags(dataset, tmp_path):
    root, _, _ = dataset(count=1)
    config = tmp_path / "render.yaml"
    config.write_text(json.dumps({"mode": "canny", "low_threshold": 10, "high_threshold": 20}))
    rows = run(root, "--config", str(config))
    control = np.asarray(Image.open(root / rows[0]["conditioning_image"]))[..., 0]
    np.testing.assert_array_equal(control, cv2.Canny(cv2.imread(str(root / rows[0]["image"])), 10, 20))


def test_reference_mode_shares_the_canny_edges_of_one_reference_skin(dataset, tmp_path):
    """The original experiments 1-3: every row trains against the edges of one reference keyboard."""
    root, _, _ = dataset(count=3)
    reference = tmp_path / "reference.png"
    draw_skin(0)[0].save(reference)
    rows = run(root, "--mode", "reference", "--reference_image", str(reference))
    assert {row["conditioning_image"] for row in rows} == {"conditioning_images/reference.png"}
    assert sorted(p.name for p in (root / "conditioning_images").glob("*.png")) == ["reference.png"]
    control = np.asarray(Image.open(root / "conditioning_images/reference.png"))
    for channel in range(3):
        np.testing.assert_array_equal(control[..., channel], cv2.Canny(cv2.imread(str(reference)), 50, 80))
    assert [row["custom"] for row in rows] == [{"keep": i} for i in range(3)]

    draw_skin(1)[0].save(reference)  # another reference skin (same path): the shared image is made again
    run(root, "--mode", "reference", "--reference_image", str(reference))
    control = np.asarray(Image.open(root / "conditioning_images/reference.png"))[..., 0]
    np.testing.assert_array_equal(control, cv2.Canny(cv2.imread(str(reference)), 50, 80))


def test_reference_glyph_mode_writes_each_rows_text_onto_the_shared_edges(dataset, tmp_path):
    root, _, inks = dataset(count=2)
    reference = tmp_path / "reference.png"
    draw_skin(2)[0].save(reference)  # a skin without text
    edges = cv2.Canny(cv2.imread(str(reference)), 50, 80)
    rows = run(root, "--mode", "reference_glyph", "--reference_image", str(reference))
    reader = get_ocr("rapidocr", num_threads=2)
    for row, ink in zip(rows, inks):
        assert sorted(row["texts"]) == sorted(ink) and len(row["box"]) == len(ink)
        control = np.asarray(Image.open(root / row["conditioning_image"]))
        assert (control[edges > 0] == 255).all()  # every edge of the reference is there
        assert sorted(line.text for line in reader.read(control)) == sorted(ink)

    Image.open(reference).resize((256, 256)).save(reference)
    with pytest.raises(SkingenError, match=r"train.jsonl:1: image images/skin_0.png is 512x512 but the reference"):
        run(root, "--mode", "reference_glyph", "--reference_image", str(reference))
