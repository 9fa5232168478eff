"""Canny control as the seed made it, CJK font discovery, and glyph rendering at quads."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from skingen.errors import SkingenError
from skingen.prep import glyphs
from skingen.prep.glyphs import canny_control, find_cjk_font, render_glyph_control
from skingen.prep.ocr import TextLine, crop_quad, get_ocr


@pytest.fixture(scope="module")
def ocr():
    return get_ocr("rapidocr", num_threads=2)


def outline_template(size=(320, 256)) -> Image.Image:
    template = Image.new("RGB", size)
    ImageDraw.Draw(template).rectangle((4, 4, size[0] - 5, size[1] - 5), outline=(255, 255, 255), width=2)
    return template


def test_canny_control_is_cv2_canny_of_the_file(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.zeros((96, 128, 3), np.uint8)
    pixels[20:70, 30:100] = (200, 40, 90)
    pixels[40:50, :] = (10, 200, 30)
    pixels = np.clip(pixels.astype(int) + rng.integers(-30, 30, pixels.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "skin.png"
    Image.fromarray(pixels).save(path)

    control = canny_control(Image.open(path))
    expected = cv2.Canny(cv2.imread(str(path)), 50, 80)
    assert control.mode == "RGB" and control.size == (128, 96)
    for channel in range(3):
        np.testing.assert_array_equal(np.asarray(control)[..., channel], expected)
    looser = np.asarray(canny_control(Image.open(path), low_threshold=10, high_threshold=20))[..., 0]
    assert looser.sum() > expected.sum()


def test_found_font_has_chinese_glyphs(cjk_font):
    font = ImageFont.truetype(str(cjk_font), 32)
    # A font without them draws the same 'missing glyph' box for both characters.
    first, second = (np.asarray(font.getmask(ch)) for ch in "前往")
    assert first.shape != second.shape or not np.array_equal(first, second)


def test_explicit_font_must_exist_and_be_a_font(tmp_path, cjk_font):
    assert find_cjk_font(cjk_font) == cjk_font
    with pytest.raises(SkingenError, match="--font .*nope.ttf: file not found.*fonts-wqy-microhei"):
        find_cjk_font(tmp_path / "nope.ttf")
    fake = tmp_path / "fake.ttf"
    fake.write_text("not a font")
    with pytest.raises(SkingenError, match="fake.ttf: not a font file"):
        find_cjk_font(fake)


def test_no_font_anywhere_says_how_to_install(monkeypatch):
    monkeypatch.setattr(glyphs.shutil, "which", lambda name: None)
    monkeypatch.setattr(glyphs, "KNOWN_CJK_FONTS", ("/nonexistent/wqy-microhei.ttc",))
    with pytest.raises(
        SkingenError, match="no font with Chinese glyphs found.*apt-get install fonts-wqy-microhei.*--font"
    ):
        find_cjk_font()


def test_glyphs_drawn_inside_their_boxes_and_readable(ocr, cjk_font):
    template = outline_template()
    lines = [
        TextLine([[40.0, 30.0], [130.0, 30.0], [130.0, 70.0], [40.0, 70.0]], "前往", 1.0),
        TextLine([[150.0, 150.0], [290.0, 150.0], [290.0, 190.0], [150.0, 190.0]], "Hello", 1.0),
    ]
    out = np.asarray(render_glyph_control(template, lines, cjk_font))
    assert out.shape == (256, 320, 3)
    # The template is kept and nothing is drawn outside the boxes.
    inside = np.zeros(out.shape[:2], bool)
    for line in lines:
        (x0, y0), _, (x1, y1), _ = line.quad
        inside[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = True
    np.testing.assert_array_equal(out[~inside], np.asarray(template)[~inside])
    # Each string is scaled to its box: its ink spans most of the box's height or width.
    for line in lines:
        (x0, y0), _, (x1, y1), _ = line.quad
        ys, xs = np.nonzero(out[int(y0) : int(y1), int(x0) : int(x1), 0] > 128)
        assert (np.ptp(ys) + 1) / (y1 - y0) > 0.7 or (np.ptp(xs) + 1) / (x1 - x0) > 0.85
    assert sorted(line.text for line in ocr.read(out)) == ["Hello", "前往"]


def test_glyph_follows_a_rotated_quad(ocr, cjk_font):
    center, width, height, angle = np.array([160.0, 128.0]), 150.0, 44.0, np.deg2rad(20)
    along, across = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    quad = [
        center + sx * width / 2 * along + sy * height / 2 * across for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))
    ]
    quad = [p.tolist() for p in quad]
    out = np.asarray(render_glyph_control(Image.new("RGB", (320, 256)), [TextLine(quad, "搜索Hello", 1.0)], cjk_font))
    [(text, _score)] = ocr.recognize([crop_quad(out, quad)])
    assert text == "搜索Hello"
    # The ink's principal direction follows the box's angle.
    ys, xs = np.nonzero(out[..., 0] > 128)
    direction = np.linalg.svd(np.c_[xs - xs.mean(), ys - ys.mean()], full_matrices=False)[2][0]
    assert abs(abs(np.degrees(np.arctan2(direction[1], direction[0]))) % 180 - 20) < 5


def test_empty_text_and_degenerate_boxes_draw_nothing(cjk_font):
    template = outline_template()
    lines = [
        TextLine([[10.0, 10.0], [60.0, 10.0], [60.0, 40.0], [10.0, 40.0]], "  ", 1.0),
        TextLine([[10.0, 10.0], [11.0, 10.0], [11.0, 11.0], [10.0, 11.0]], "前", 1.0),
        TextLine([[400.0, 300.0], [460.0, 300.0], [460.0, 330.0], [400.0, 330.0]], "前", 1.0),  # off the canvas
    ]
    np.testing.assert_array_equal(np.asarray(render_glyph_control(template, lines, cjk_font)), np.asarray(template))
