"""OCR interface: RapidOCR reads text drawn at known places; crops of rotated lines read back; PaddleOCR result parsing."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw
from textimages import cjk_font_at, draw_texts, iou

from skingen.errors import SkingenError
from skingen.prep.ocr import TextLine, crop_quad, get_ocr, lines_from_paddle_result, texts_from_paddle_recognition

DRAWN = [((60, 40), "前往", (255, 255, 255)), ((300, 120), "搜索", (250, 220, 0)), ((60, 330), "Hello", (20, 20, 20))]


@pytest.fixture(scope="module")
def ocr():
    return get_ocr("rapidocr", num_threads=2)


def skin_with_text(size=(512, 512)):
    """A flat 'skin' with a light key, and the DRAWN strings; returns the image and each string's ink box."""
    image = Image.new("RGB", size, (40, 90, 160))
    ImageDraw.Draw(image).rounded_rectangle((30, 310, 250, 390), 12, fill=(230, 230, 240))
    return image, draw_texts(image, DRAWN, font_size=32)


def test_read_finds_drawn_text_at_its_place(ocr):
    image, boxes = skin_with_text()
    lines = ocr.read(np.asarray(image))
    assert sorted(line.text for line in lines) == sorted(boxes)
    for line in lines:
        assert line.score > 0.9
        assert iou(line.quad, boxes[line.text]) > 0.5
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = line.quad
        # clockwise from top-left
        assert x1 > x0 and y3 > y0 and x2 > x3 and y2 > y1


def test_read_batch_matches_read_and_handles_blank_images(ocr):
    image, _ = skin_with_text()
    blank = np.full((256, 256, 3), 128, np.uint8)
    batch = ocr.read_batch([np.asarray(image), blank])
    assert [line.text for line in batch[0]] == [line.text for line in ocr.read(np.asarray(image))]
    assert batch[1] == []


def test_crop_quad_of_axis_aligned_box_is_the_slice():
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    crop = crop_quad(image, [[10, 20], [50, 20], [50, 40], [10, 40]])
    np.testing.assert_array_equal(crop, image[20:40, 10:50])


@pytest.mark.parametrize("angle", [25, 90])
def test_rotated_line_reads_after_crop_quad(ocr, angle):
    text = "搜索Hello"
    font = cjk_font_at(36)
    left, top, right, bottom = font.getbbox(text)
    w, h = right - left + 16, bottom - top + 16
    patch = Image.new("RGB", (w, h), (250, 250, 250))
    ImageDraw.Draw(patch).text((8 - left, 8 - top), text, font=font, fill=(10, 10, 10))
    # Rotate the patch (clockwise by `angle`) into a larger canvas and follow its corners.
    canvas_size = 400
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), -angle, 1.0)
    matrix[:, 2] += (canvas_size / 2 - w / 2, canvas_size / 2 - h / 2)
    canvas = cv2.warpAffine(np.asarray(patch), matrix, (canvas_size, canvas_size), borderValue=(90, 40, 40))
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    quad = (np.c_[corners, np.ones(4)] @ matrix.T).tolist()

    crop = crop_quad(canvas, quad)
    assert abs(crop.shape[1] - w) <= 1 and abs(crop.shape[0] - h) <= 1
    [(read, score)] = ocr.recognize([crop])
    assert read == text and score > 0.5


def test_recognize_nothing_is_nothing(ocr):
    assert ocr.recognize([]) == []


def test_paddle3_result_becomes_text_lines():
    page = {
        "rec_texts": ["前往", "Hello"],
        "rec_scores": np.array([0.99, 0.75]),
        "rec_polys": [
            np.array([[58, 40], [127, 40], [127, 79], [58, 79]], dtype=np.int16),
            np.array([[57, 322], [137, 322], [137, 356], [57, 356]], dtype=np.int16),
        ],
        "dt_polys": [],
    }
    assert lines_from_paddle_result(page) == [
        TextLine([[58.0, 40.0], [127.0, 40.0], [127.0, 79.0], [58.0, 79.0]], "前往", pytest.approx(0.99)),
        TextLine([[57.0, 322.0], [137.0, 322.0], [137.0, 356.0], [57.0, 356.0]], "Hello", pytest.approx(0.75)),
    ]


def test_paddle2_result_becomes_text_lines():
    page = [[[[430.0, 174.0], [450.0, 174.0], [450.0, 186.0], [430.0, 186.0]], ("前往", 0.991)]]
    assert lines_from_paddle_result(page) == [
        TextLine([[430.0, 174.0], [450.0, 174.0], [450.0, 186.0], [430.0, 186.0]], "前往", 0.991)
    ]
    assert lines_from_paddle_result(None) == []


def test_paddle_recognition_results_become_pairs():
    assert texts_from_paddle_recognition([{"rec_text": "搜索", "rec_score": np.float32(0.5)}]) == [("搜索", 0.5)]
    assert texts_from_paddle_recognition([("搜索", 0.25)]) == [("搜索", 0.25)]


def test_paddle_backend_without_paddleocr_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "paddleocr", None)  # makes `import paddleocr` fail
    with pytest.raises(SkingenError, match="pip install paddleocr paddlepaddle") as err:
        get_ocr("paddle", det_model_dir="det", rec_model_dir="rec")
    assert "--det_model_dir" in str(err.value)


def test_bad_backend_and_missing_model_are_clear(tmp_path):
    with pytest.raises(SkingenError, match="unknown OCR backend 'tesseract'"):
        get_ocr("tesseract")
    with pytest.raises(SkingenError, match="--rec_model_path .*missing.onnx: not found"):
        get_ocr("rapidocr", rec_model_path=tmp_path / "missing.onnx")


def test_bad_quad_is_clear():
    with pytest.raises(SkingenError, match="4 \\[x, y\\] points"):
        crop_quad(np.zeros((10, 10, 3), np.uint8), [[0, 0], [5, 0], [5, 5]])
