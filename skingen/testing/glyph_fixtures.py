"""Two families of synthetic keyboard-like glyph datasets, for measuring text rendering on unseen layouts.

Each family writes a dataset folder (``train.jsonl`` with ``box`` + ``texts``, images, glyph control images drawn
by :func:`skingen.prep.glyphs.render_glyph_control`, as ``render_glyphs.py --mode glyph`` would). The first rows use the
family's *training* label strings, the last ``heldout_rows`` rows only its *held-out* strings (no string in common),
at their own random positions: a model trained on the first rows meets unseen controls on the last ones.

The families differ in what matters for reading text:

- ``light`` (tune on this one): dark ink on light keys (high contrast); one CJK font (WenQuanYi Micro Hei) for
  Chinese and Latin; label sizes 11 (small corner hints), 16 and 22 px at 128 px; labels tilted up to 12 degrees;
  2 key rows x 2 keys, a main label per key and a digit hint on every other key.
- ``dark`` (confirm on this one): light ink on dark keys (lower, inverted contrast); Latin labels in DejaVu Serif
  Bold, Chinese in the CJK font; sizes 10 (sub-labels), 14, 19 and 24 px; a tall side key whose label runs
  vertically (rotated 90 degrees, read top to bottom); 3 key rows x 2 keys with a phone-keypad sub-label
  ("abc") under some main labels.

The glyph control always uses the CJK font, as it would for a real skin whose own font is unknown.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import SkingenError
from ..prep.glyphs import find_cjk_font, render_glyph_control
from ..prep.ocr import TextLine

LATIN_SERIF_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Bold.ttf",
    "/usr/share/fonts/dejavu/DejaVuSerif-Bold.ttf",
    "/usr/share/fonts/TTF/DejaVuSerif-Bold.ttf",
)


@dataclass(frozen=True)
class GlyphFamily:
    name: str
    dark_keys: bool  # light ink on dark keys instead of dark ink on light keys
    latin_font: str  # "cjk" or "serif"
    main_sizes: tuple[int, ...]  # main label sizes in px at 128 px
    small_size: int  # hint / sub-label size in px at 128 px
    key_rows: int
    keys_per_row: int
    max_tilt: float  # degrees; main labels are tilted uniformly within +-max_tilt
    vertical_key: bool  # a tall side key with a label rotated 90 degrees
    train_words: tuple[str, ...]
    heldout_words: tuple[str, ...]
    train_small: tuple[str, ...]
    heldout_small: tuple[str, ...]


FAMILIES = {
    "light": GlyphFamily(
        name="light", dark_keys=False, latin_font="cjk", main_sizes=(16, 22), small_size=11, key_rows=2,
        keys_per_row=2, max_tilt=12.0, vertical_key=False,
        train_words=("前往", "搜索", "删除", "换行", "发送", "空格", "返回", "确定", "完成", "符号", "中文", "英文",
                     "OK", "Go", "Del", "ABC", "Tab", "Esc"),
        heldout_words=("表情", "数字", "拼音", "设置", "复制", "粘贴", "Alt", "Fn", "Home"),
        train_small=("1", "2", "3", "4", "5"), heldout_small=("6", "7", "8", "9"),
    ),
    "dark": GlyphFamily(
        name="dark", dark_keys=True, latin_font="serif", main_sizes=(14, 19, 24), small_size=10, key_rows=3,
        keys_per_row=2, max_tilt=0.0, vertical_key=True,
        train_words=("发送", "换行", "选择", "撤销", "全选", "剪切", "分词", "重输", "Send", "Next", "Back", "Done",
                     "Tab", "Del"),
        heldout_words=("语音", "键盘", "翻译", "主题", "Caps", "Menu", "Find", "Home"),
        train_small=("abc", "def", "ghi", "jkl"), heldout_small=("mno", "pqrs", "tuv", "wxyz"),
    ),
}

CAPTION_PREFIX = "a keyboard skin, iflyskin, "


def family(name: str) -> GlyphFamily:
    if name not in FAMILIES:
        raise SkingenError(f"glyph family {name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _is_latin(text: str) -> bool:
    return all(ord(ch) < 0x3000 for ch in text)


class _Fonts:
    def __init__(self, fam: GlyphFamily):
        self.cjk = str(find_cjk_font())
        self.latin = self.cjk
        if fam.latin_font == "serif":
            found = [path for path in LATIN_SERIF_FONTS if Path(path).is_file()]
            if not found:
                raise SkingenError(f"the 'dark' glyph family needs DejaVu Serif Bold ({LATIN_SERIF_FONTS[0]}); "
                                   "install it (Debian/Ubuntu: apt-get install fonts-dejavu-core)")
            self.latin = found[0]

    def get(self, text: str, size: int) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(self.latin if _is_latin(text) else self.cjk, size)


def _text_patch(text: str, font: ImageFont.FreeTypeFont, pad: int = 2) -> np.ndarray:
    """``text`` white on black, upright, with ``pad`` pixels around its ink."""
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(mask).text((pad - left, pad - top), text, font=font, fill=255)
    return np.asarray(mask)


def _rotation(patch_wh: tuple[int, int], centre: tuple[float, float], angle: float) -> np.ndarray:
    """2x3 affine map from patch pixels to image pixels: the patch centred at ``centre``, turned ``angle`` degrees
    counter-clockwise on screen (-90: text read top to bottom)."""
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    rotation = np.array([[cos, sin], [-sin, cos]])
    shift = np.asarray(centre) - rotation @ (np.asarray(patch_wh, dtype=np.float64) / 2)
    return np.hstack([rotation, shift[:, None]])


def _rotated_extent(patch_wh: tuple[int, int], angle: float) -> tuple[float, float]:
    a = math.radians(angle)
    w, h = patch_wh
    return abs(w * math.cos(a)) + abs(h * math.sin(a)), abs(w * math.sin(a)) + abs(h * math.cos(a))


class _Canvas:
    """An image being drawn plus the quads and strings of its labels."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels.astype(np.float32)
        self.boxes: list[list[list[float]]] = []
        self.texts: list[str] = []

    def place(self, text: str, font, region: tuple[float, float, float, float], angle: float, ink,
              rng: np.random.Generator, anchor: str = "random") -> bool:
        """Draw ``text`` inside ``region`` (x0, y0, x1, y1) at ``angle``; False (nothing drawn) when it does not fit."""
        patch = _text_patch(text, font)
        patch_wh = (patch.shape[1], patch.shape[0])
        ext_w, ext_h = _rotated_extent(patch_wh, angle)
        x0, y0, x1, y1 = region
        if ext_w > x1 - x0 or ext_h > y1 - y0:
            return False
        if anchor == "random":
            cx = rng.uniform(x0 + ext_w / 2, x1 - ext_w / 2)
            cy = rng.uniform(y0 + ext_h / 2, y1 - ext_h / 2)
        else:  # "centre"
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        matrix = _rotation(patch_wh, (cx, cy), angle)
        height, width = self.pixels.shape[:2]
        alpha = cv2.warpAffine(patch, matrix, (width, height), flags=cv2.INTER_LINEAR)[..., None] / 255.0
        self.pixels = self.pixels * (1 - alpha) + np.asarray(ink, dtype=np.float32) * alpha
        corners = np.array([[0, 0, 1], [patch_wh[0], 0, 1], [patch_wh[0], patch_wh[1], 1], [0, patch_wh[1], 1]])
        self.boxes.append([[round(float(x), 2), round(float(y), 2)] for x, y in corners @ matrix.T])
        self.texts.append(text)
        return True

    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels.clip(0, 255).astype(np.uint8))


def _background(fam: GlyphFamily, resolution: int, rng: np.random.Generator) -> Image.Image:
    ramp = np.linspace(0, 1, resolution)
    if fam.dark_keys:  # horizontal gradient with diagonal stripes
        left, right = rng.integers(90, 200, 3), rng.integers(60, 220, 3)
        pixels = (left * (1 - ramp[None, :, None]) + right * ramp[None, :, None]).repeat(resolution, axis=0)
        stripes = ((np.add.outer(np.arange(resolution), np.arange(resolution)) // 9) % 2)[..., None]
        pixels = pixels * (1 - 0.15 * stripes)
    else:  # vertical gradient with random discs
        top, bottom = rng.integers(60, 230, 3), rng.integers(20, 200, 3)
        pixels = (top * (1 - ramp[:, None, None]) + bottom * ramp[:, None, None]).repeat(resolution, axis=1)
    image = Image.fromarray(pixels.astype(np.uint8))
    if not fam.dark_keys:
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y, r = rng.integers(0, resolution, 2).tolist() + [int(rng.integers(4, resolution // 6))]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 256, 3).tolist()))
    return image


def _colours(fam: GlyphFamily, rng: np.random.Generator) -> tuple[tuple, tuple]:
    if fam.dark_keys:
        return tuple(rng.integers(35, 90, 3).tolist()), tuple(rng.integers(150, 215, 3).tolist())
    return tuple(rng.integers(200, 256, 3).tolist()), tuple(rng.integers(0, 70, 3).tolist())


def _key_rects(fam: GlyphFamily, resolution: int) -> tuple[list[tuple[int, int, int, int]], tuple | None]:
    """The keys of the grid (x0, y0, x1, y1) and the tall side key (or None)."""
    s = resolution / 128
    grid_right = round(resolution * (0.72 if fam.vertical_key else 1.0))
    key_w = (grid_right - round(4 * s)) / fam.keys_per_row
    key_h = (resolution - round(4 * s)) / fam.key_rows
    gap = max(1, round(3 * s))
    keys = [
        (round(2 * s + c * key_w + gap / 2), round(2 * s + r * key_h + gap / 2),
         round(2 * s + (c + 1) * key_w - gap / 2), round(2 * s + (r + 1) * key_h - gap / 2))
        for r in range(fam.key_rows) for c in range(fam.keys_per_row)
    ]
    side = (grid_right + gap, round(2 * s + gap / 2), resolution - round(2 * s), resolution - round(2 * s)) \
        if fam.vertical_key else None
    return keys, side


def _draw_row(fam: GlyphFamily, fonts: _Fonts, resolution: int, words: tuple[str, ...], small: tuple[str, ...],
              rng: np.random.Generator) -> tuple[Image.Image, Image.Image, list, list[str]]:
    s = resolution / 128
    image = _background(fam, resolution, rng)
    key_fill, ink = _colours(fam, rng)
    template = Image.new("RGB", (resolution, resolution))
    keys, side = _key_rects(fam, resolution)
    draw, template_draw = ImageDraw.Draw(image), ImageDraw.Draw(template)
    for rect in keys + ([side] if side else []):
        draw.rounded_rectangle(rect, radius=round(4 * s), fill=key_fill)
        template_draw.rounded_rectangle(rect, radius=round(4 * s), outline=(96, 96, 96))
    canvas = _Canvas(np.asarray(image))
    inset = 2 * s
    for k, (x0, y0, x1, y1) in enumerate(keys):
        has_small = k % 2 == 1
        main_region = (x0 + inset, y0 + inset, x1 - inset, y1 - inset)
        if has_small and fam.vertical_key:  # phone-keypad sub-label under the main label
            split = y0 + (y1 - y0) * 0.62
            main_region = (x0 + inset, y0 + inset, x1 - inset, split)
            canvas.place(str(rng.choice(small)), fonts.get("abc", round(fam.small_size * s)),
                         (x0 + inset, split, x1 - inset, y1 - inset), 0.0, ink, rng, anchor="centre")
        elif has_small:  # digit hint in the top-right corner
            size = round(fam.small_size * s)
            canvas.place(str(rng.choice(small)), fonts.get("1", size),
                         (x1 - inset - size, y0 + inset, x1 - inset, y0 + inset + size + 4 * s), 0.0, ink, rng)
            main_region = (x0 + inset, y0 + inset + size * 0.6, x1 - inset - size, y1 - inset)
        word = str(rng.choice(words))
        angle = float(rng.uniform(-fam.max_tilt, fam.max_tilt))
        # A random size of the family's; smaller ones when the word does not fit at any of them.
        sizes = [*rng.permutation(fam.main_sizes).tolist(), *range(min(fam.main_sizes) - 1, fam.small_size, -1)]
        for size in sizes:
            if canvas.place(word, fonts.get(word, round(size * s)), main_region, angle, ink, rng):
                break
    if side:
        word = str(rng.choice([w for w in words if not _is_latin(w)]))
        region = (side[0] + inset, side[1] + inset, side[2] - inset, side[3] - inset)
        for size in range(max(fam.main_sizes), fam.small_size, -1):
            if canvas.place(word, fonts.get(word, round(size * s)), region, -90.0, ink, rng):
                break
    lines = [TextLine(box, text, 1.0) for box, text in zip(canvas.boxes, canvas.texts)]
    control = render_glyph_control(template, lines, fonts.cjk)
    return canvas.image(), control, canvas.boxes, canvas.texts


def write_glyph_family(out_dir: str | Path, name: str, *, rows: int = 24, heldout_rows: int = 8,
                       resolution: int = 128, seed: int = 0) -> Path:
    """Write family ``name``'s dataset to ``out_dir``: ``rows`` rows, the last ``heldout_rows`` of them with the
    held-out label strings only. Returns ``out_dir``."""
    fam = family(name)
    if not 0 < heldout_rows < rows:
        raise SkingenError(f"heldout_rows must be between 1 and rows - 1 ({rows - 1}), got {heldout_rows}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "conditioning_images").mkdir(exist_ok=True)
    fonts = _Fonts(fam)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(rows):
        heldout = i >= rows - heldout_rows
        words, small = (fam.heldout_words, fam.heldout_small) if heldout else (fam.train_words, fam.train_small)
        image, control, boxes, texts = _draw_row(fam, fonts, resolution, words, small, rng)
        image.save(out / "images" / f"{i}.png")
        control.save(out / "conditioning_images" / f"{i}.png")
        lines.append(json.dumps({
            "text": CAPTION_PREFIX + ", ".join(f'writing "{t}"' for t in texts),
            "image": f"images/{i}.png", "conditioning_image": f"conditioning_images/{i}.png",
            "box": boxes, "texts": texts,
        }, ensure_ascii=False))
    (out / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
