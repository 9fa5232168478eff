"""Conditioning images drawn from an image's content: Canny edges, and the layout template
with the image's own text re-rendered at its boxes (GlyphControl-style); CJK font discovery."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.rows import box_problem
from ..errors import SkingenError
from .ocr import TextLine, as_quad, quad_size, to_bgr

# Checked in order when fontconfig finds no Chinese font (Debian/Ubuntu, Fedora, Arch paths).
KNOWN_CJK_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
)

INSTALL_HINT = (
    "install one (Debian/Ubuntu: apt-get install fonts-wqy-microhei, or fonts-noto-cjk) "
    "or pass --font PATH to a .ttf/.ttc/.otf font that has Chinese glyphs"
)


def canny_control(image, low_threshold: int = 50, high_threshold: int = 80) -> Image.Image:
    """``cv2.Canny`` as the seed ran it on ``cv2.imread`` output; white edges on black, RGB.

    ``image`` is RGB (PIL or array; grey and RGBA arrays too). Canny on a colour image follows the
    channel with the strongest gradient and breaks ties by channel order, so it gets BGR, like imread.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    edges = cv2.Canny(to_bgr(pixels), low_threshold, high_threshold)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _loadable_font(path: Path, source: str) -> Path:
    try:
        ImageFont.truetype(str(path), 16)
    except OSError:
        raise SkingenError(f"{source} {path}: not a font file Pillow can open; {INSTALL_HINT}") from None
    return path


def _fontconfig_chinese_fonts() -> list[Path]:
    """Fonts fontconfig says cover Chinese, fc-match's pick first.

    ``fc-match ':lang=zh'`` alone is not enough: with no Chinese font installed it
    still answers (e.g. DejaVuSans), so its answer is kept only if ``fc-list`` agrees.
    """
    if shutil.which("fc-list") is None:
        return []
    try:
        listed = subprocess.run(
            ["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
        matched = subprocess.run(
            ["fc-match", "-f", "%{file}", ":lang=zh"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    fonts = sorted({line.split(":")[0].strip() for line in listed.splitlines() if line.strip()})
    if matched in fonts:
        fonts.remove(matched)
        fonts.insert(0, matched)
    return [Path(f) for f in fonts if Path(f).is_file()]


def find_cjk_font(preferred: str | Path | None = None) -> Path:
    """A font with Chinese glyphs: ``preferred`` if given, else fontconfig's choice, else a known path."""
    if preferred is not None:
        path = Path(preferred)
        if not path.is_file():
            raise SkingenError(f"--font {path}: file not found; {INSTALL_HINT}")
        return _loadable_font(path, "--font")
    candidates = _fontconfig_chinese_fonts() + [Path(p) for p in KNOWN_CJK_FONTS if Path(p).is_file()]
    if not candidates:
        raise SkingenError(
            f"no font with Chinese glyphs found (fontconfig and {KNOWN_CJK_FONTS[0]} checked); {INSTALL_HINT}"
        )
    return _loadable_font(candidates[0], "font")


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _glyph_mask(text: str, width: int, height: int, font_path: str) -> np.ndarray:
    """``text`` white on black in a ``height x width`` box: ink scaled to fit, aspect kept, centred."""
    size = max(1, height)
    left, top, right, bottom = _font(font_path, size).getbbox(text)
    ink_w, ink_h = max(1, right - left), max(1, bottom - top)
    size = max(1, int(size * min(width / ink_w, height / ink_h)))
    # Glyph metrics do not scale exactly linearly with the size: step down until the ink fits.
    while True:
        font = _font(font_path, size)
        left, top, right, bottom = font.getbbox(text)
        if (right - left <= width and bottom - top <= height) or size == 1:
            break
        size -= 1
    mask = Image.new("L", (width, height), 0)
    origin = ((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top)
    ImageDraw.Draw(mask).text(origin, text, font=font, fill=255)
    return np.asarray(mask)


def render_glyph_control(
    template: Image.Image, lines: Iterable[TextLine], font_path: str | Path, color=(255, 255, 255)
) -> Image.Image:
    """The template with each line's text drawn at its quad (image pixels of the template's size).

    Each string is rendered upright into a rectangle the size of its box, then
    perspective-warped onto the quad, so it takes the box's position, size and angle.
    """
    canvas = np.array(template.convert("RGB"))
    canvas_h, canvas_w = canvas.shape[:2]
    for line in lines:
        text = line.text.strip()
        width, height = (round(v) for v in quad_size(line.quad))
        if not text or width < 2 or height < 2:
            continue
        quad = as_quad(line.quad)
        # Warp only into the quad's bounding rectangle (clipped to the canvas), not the whole image.
        x0, y0 = np.floor(quad.min(axis=0)).astype(int).clip(0, [canvas_w, canvas_h])
        x1, y1 = np.ceil(quad.max(axis=0)).astype(int).clip(0, [canvas_w, canvas_h])
        if x1 <= x0 or y1 <= y0:
            continue
        mask = _glyph_mask(text, width, height, str(font_path))
        rect = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
        matrix = cv2.getPerspectiveTransform(rect, quad - np.array([x0, y0], dtype=np.float32))
        warped = cv2.warpPerspective(mask, matrix, (int(x1 - x0), int(y1 - y0)), flags=cv2.INTER_LINEAR)
        glyph = (warped[..., None].astype(np.float32) / 255.0) * np.asarray(color, dtype=np.float32)
        region = canvas[y0:y1, x0:x1]
        np.maximum(region, glyph.astype(np.uint8), out=region)
    return Image.fromarray(canvas)


@dataclass
class GlyphCounts:
    """What the glyph modes kept of the OCR's lines (one warning line at the end of the run)."""

    found: int = 0
    kept: int = 0
    low_score: int = 0
    unusable_box: int = 0
    rows_without_text: int = 0


def keep_ocr_lines(lines, size: tuple[int, int], min_confidence: float, counts: GlyphCounts) -> list:
    """The OCR lines a row keeps: confident, non-blank, with a box the row check accepts."""
    good = []
    for line in lines:
        if line.score < min_confidence or not line.text.strip():
            counts.low_score += 1
        elif box_problem(line.quad, size) is not None:
            counts.unusable_box += 1
        else:
            good.append(line)
    counts.found += len(lines)
    counts.kept += len(good)
    counts.rows_without_text += not good
    return good
