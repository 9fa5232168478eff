"""Test images with text drawn at known places (for OCR, glyph, metric and evaluation tests), and box overlap.

A plain module, not a test file: tests import it as ``from textimages import ...`` (pytest puts the
tests folder on sys.path, as it has no __init__.py).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from skingen.prep.glyphs import find_cjk_font

SKIN_TEXTS = ["前往", "搜索", "设置"]


@functools.cache
def cjk_font_at(size: int) -> ImageFont.FreeTypeFont:
    """The CJK font the stages find (``find_cjk_font``) at ``size`` px."""
    return ImageFont.truetype(str(find_cjk_font()), size)


def draw_texts(image: Image.Image, placements, font_size: int) -> dict[str, tuple[int, int, int, int]]:
    """Draw each ``(top_left, text, colour)`` of ``placements`` on ``image``; returns each text's ink box
    ``(x0, y0, x1, y1)``."""
    draw = ImageDraw.Draw(image)
    font = cjk_font_at(font_size)
    ink = {}
    for xy, text, colour in placements:
        draw.text(xy, text, font=font, fill=colour)
        ink[text] = draw.textbbox(xy, text, font=font)
    return ink


def box_quad(box, margin: int = 0) -> list[list[int]]:
    """The 4-point quad (clockwise from top-left) of an ``(x0, y0, x1, y1)`` box grown by ``margin`` px."""
    x0, y0, x1, y1 = box[0] - margin, box[1] - margin, box[2] + margin, box[3] + margin
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def skin_with_texts(texts=SKIN_TEXTS, size=(480, 160), font_size=44) -> tuple[Image.Image, list]:
    """``texts`` in a row on a light skin, dark ink; returns the image and each text's quad (ink box + 8 px)."""
    image = Image.new("RGB", size, (240, 236, 228))
    placements = [((20 + index * 150, 50), text, (30, 30, 30)) for index, text in enumerate(texts)]
    ink = draw_texts(image, placements, font_size)
    return image, [box_quad(ink[text], margin=8) for text in texts]


def iou(quad, box) -> float:
    """Intersection over union of a quad's bounding rectangle and an ``(x0, y0, x1, y1)`` box."""
    q = np.asarray(quad)
    qx0, qy0, qx1, qy1 = q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max()
    x0, y0, x1, y1 = box
    inter = max(0, min(qx1, x1) - max(qx0, x0)) * max(0, min(qy1, y1) - max(qy0, y0))
    return inter / ((qx1 - qx0) * (qy1 - qy0) + (x1 - x0) * (y1 - y0) - inter)
