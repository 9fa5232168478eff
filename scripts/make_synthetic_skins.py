"""Make varied synthetic skin packages for tests and demos (no real skins needed).

Each package holds the files the shipped layouts look for (``key_elements``, ``four_parts``,
``full_keyboard``): a candidate bar with Chinese words (前往, 搜索, 设置, ...), a keyboard
background (gradients, stripes, dots; with ``--picture_fraction`` a picture of large shapes placed per skin),
solid, see-through or outlined keys, the 9-key panel, the 26-key key background, function keys
with Chinese and Latin labels, the letter-key area and function row of the four-part form, and
a whole-keyboard preview. Some keys are real 9-patch PNGs, some packages are .zip files, file
names follow one of three naming conventions, and a few optional keys are left out. The output
is byte-identical for the same arguments.

    python scripts/make_synthetic_skins.py --out skins/ --n 8 --seed 0
    python scripts/make_synthetic_skins.py --out bds_skins/ --n 8 --format bds   # Baidu IME .bds packages
"""

from __future__ import annotations

import argparse
import colorsys
import functools
import io
import random
import shutil
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skingen.config import parse_args_with_config  # noqa: E402
from skingen.errors import SkingenError, run_cli  # noqa: E402
from skingen.fileio import AtomicDirectory, atomic_write_bytes  # noqa: E402
from skingen.prep.glyphs import find_cjk_font  # noqa: E402
from skingen.skins.bds.synthetic import write_synthetic_bds  # noqa: E402

NAV_WORDS = ("前往", "搜索", "设置", "皮肤", "表情", "语音", "翻译", "键盘", "手写", "剪贴板")
LETTER_ROWS = ("QWERTYUIOP", "ASDFGHJKL", "ZXCVBNM")
T9_LABELS = ("分词", "ABC", "DEF", "GHI", "JKL", "MNO", "PQRS", "TUV", "WXYZ")
# Function keys: element id -> label choices (Chinese and Latin).
KEY_LABELS = {
    "key_shift": ("大写", "Shift"),
    "key_delete": ("删除", "Del"),
    "key_enter": ("发送", "确定", "换行", "Enter"),
    "key_num": ("123",),
    "key_space": ("空格", "中文", "Space"),
    "key_switch_lang": ("中/英",),
    "key_emoji": ("表情", ":-)"),
    "key_comma": ("，",),
    "key_period": ("。",),
}
OPTIONAL_KEYS = ("key_switch_lang", "key_emoji", "key_comma", "key_period")
# Three file-naming conventions seen in skin packages; every name is found by the shipped layouts' patterns.
NAMING = (
    {
        "candidate_bar": "bar_candidate", "keyboard_bg": "keyboard_bg", "key_9_bg": "key_9_bg", "key_26_bg": "key_26_bg",
        "key_shift": "key_shift", "key_delete": "key_delete", "key_enter": "key_enter", "key_num": "key_123",
        "key_space": "key_space", "key_switch_lang": "key_switch_lang", "key_emoji": "key_emoji",
        "key_comma": "key_comma", "key_period": "key_period", "letter_keys": "part_letters",
        "function_row": "part_function", "preview": "preview",
    },
    {
        "candidate_bar": "candidate_bar_bg", "keyboard_bg": "bg_keyboard", "key_9_bg": "panel_t9_bg",
        "key_26_bg": "btn_qwerty_normal", "key_shift": "btn_shift_normal", "key_delete": "btn_del_normal",
        "key_enter": "btn_enter_normal", "key_num": "btn_num_normal", "key_space": "btn_space_normal",
        "key_switch_lang": "btn_lang_normal", "key_emoji": "btn_emoji_normal", "key_comma": "btn_comma_normal",
        "key_period": "btn_period_normal", "letter_keys": "keys_letters", "function_row": "function_row",
        "preview": "preview_full",
    },
    {
        "candidate_bar": "topbar", "keyboard_bg": "background", "key_9_bg": "t9_panel", "key_26_bg": "qwerty_key",
        "key_shift": "shift", "key_delete": "delete", "key_enter": "enter", "key_num": "123", "key_space": "space",
        "key_switch_lang": "switch_lang", "key_emoji": "emoji", "key_comma": "comma", "key_period": "period",
        "letter_keys": "part_letters_26", "function_row": "part_function_row", "preview": "keyboard_full",
    },
)
BASE = 1024  # element sizes below are pixels of a 1024-wide keyboard; each package scales them


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the packages into (skin_0000, skin_0001.zip, ...)")
    parser.add_argument("--n", type=int, default=8, help="number of packages")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--zip_fraction", type=float, default=0.25, help="share of packages written as .zip")
    parser.add_argument(
        "--ninepatch_fraction", type=float, default=0.5, help="share of key images written as 9-patch (*.9.png)"
    )
    parser.add_argument(
        "--picture_fraction", type=float, default=0.5,
        help="share of skins whose keyboard background is a picture (large shapes of its own) instead of a plain pattern",
    )
    parser.add_argument("--format", default="android", choices=("android", "bds"),
                        help="android: element-image packages; bds: Baidu IME skins (skingen/skins/bds/synthetic.py), half as .bds zips")
    parser.add_argument("--font", default=None, help="font with Chinese glyphs (default: found via fontconfig)")
    args = parse_args_with_config(parser, argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    for name in ("zip_fraction", "ninepatch_fraction", "picture_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name} must be between 0 and 1")
    return args


@functools.lru_cache(maxsize=64)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _text_colour(fill: tuple[int, ...]) -> tuple[int, int, int, int]:
    luminance = (0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]) / 255
    return (25, 25, 30, 255) if luminance > 0.55 else (250, 250, 250, 255)


class SkinStyle:
    """The look of one package, drawn from its own random generator."""

    def __init__(self, rng: random.Random, font: str, picture_fraction: float):
        self.font = font
        hue = rng.random()
        self.dark = rng.random() < 0.5
        v0, v1 = (0.25, 0.45) if self.dark else (0.75, 0.95)
        self.bg_from = _hsv(hue, rng.uniform(0.3, 0.8), v0)
        self.bg_to = _hsv(hue + rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.8), v1)
        self.gradient = rng.choice(("vertical", "horizontal", "diagonal"))
        self.pattern = rng.choice(("none", "stripes", "dots"))
        self.pattern_period = rng.randrange(24, 64, 4)
        key_v = rng.uniform(0.12, 0.3) if self.dark else rng.uniform(0.9, 1.0)
        # Keys are solid, see-through or outlined (the picture shows through the last two), as in real skins.
        self.key_style = rng.choice(("solid", "solid", "translucent", "outline"))
        key_alpha = {"solid": rng.randrange(200, 256), "translucent": rng.randrange(90, 150), "outline": 40}[self.key_style]
        self.key_fill = (*_hsv(hue, rng.uniform(0.0, 0.25), key_v), key_alpha)
        self.accent = (*_hsv(hue + 0.5, rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.8)), 255)
        self.bar_fill = (*_hsv(hue + rng.uniform(-0.1, 0.1), rng.uniform(0.2, 0.7), 0.2 if self.dark else 0.97), 255)
        self.radius = rng.uniform(0.12, 0.3)  # corner radius as a share of the key's shorter side
        self.nav_words = rng.sample(NAV_WORDS[:3], 3) + rng.sample(NAV_WORDS[3:], rng.randrange(1, 3))
        self.labels = {key: rng.choice(choices) for key, choices in KEY_LABELS.items()}
        self.lowercase = rng.random() < 0.5
        # Drawn from a generator of their own, so the rest of a skin is the same at every --picture_fraction.
        picture_rng = random.Random(rng.random())
        self.shapes = picture_shapes(picture_rng, hue, self.dark) if picture_rng.random() < picture_fraction else []


def picture_shapes(rng: random.Random, hue: float, dark: bool) -> list[tuple]:
    """A picture background: a few large shapes at places of their own (kind, box as shares of the
    background, RGB), light on dark skins and dark on light ones so their outlines are Canny edges."""
    shapes = []
    for _ in range(rng.randrange(3, 7)):
        w, h = rng.uniform(0.15, 0.45), rng.uniform(0.2, 0.6)
        x, y = rng.uniform(-0.1, 1.0 - w + 0.1), rng.uniform(-0.1, 1.0 - h + 0.1)
        value = rng.uniform(0.7, 0.95) if dark else rng.uniform(0.3, 0.5)
        colour = _hsv(hue + rng.uniform(0.2, 0.8), rng.uniform(0.4, 0.9), value)
        shapes.append((rng.choice(("ellipse", "rectangle", "triangle")), (x, y, x + w, y + h), colour))
    return shapes


def draw_background(style: SkinStyle, size: tuple[int, int]) -> Image.Image:
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = {"vertical": ys / max(height - 1, 1), "horizontal": xs / max(width - 1, 1)}.get(
        style.gradient, (xs + ys) / max(width + height - 2, 1)
    )
    rgb = np.asarray(style.bg_from, np.float32) * (1 - t[..., None]) + np.asarray(style.bg_to, np.float32) * t[..., None]
    period = style.pattern_period * width / BASE * 2
    if style.pattern == "stripes":
        mask = ((xs + ys) // max(period / 2, 2)) % 2 == 0
        rgb[mask] = rgb[mask] * 0.88 + 255 * 0.12
    elif style.pattern == "dots":
        dx, dy = (xs % period) - period / 2, (ys % period) - period / 2
        mask = dx * dx + dy * dy < (period * 0.18) ** 2
        rgb[mask] = rgb[mask] * 0.75 + 255 * 0.25
    image = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for kind, (x0, y0, x1, y1), colour in style.shapes:
        box = (x0 * width, y0 * height, x1 * width, y1 * height)
        if kind == "ellipse":
            draw.ellipse(box, fill=colour)
        elif kind == "rectangle":
            draw.rounded_rectangle(box, radius=min(box[2] - box[0], box[3] - box[1]) * 0.15, fill=colour)
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    return image


def draw_key(style: SkinStyle, draw: ImageDraw.ImageDraw, box, label: str = "", fill=None) -> tuple | None:
    """A rounded key with a soft shadow and a centred label; returns the label's bounding box."""
    x0, y0, x1, y1 = box
    radius = max(2, round(min(x1 - x0, y1 - y0) * style.radius))
    shadow = max(1, (y1 - y0) // 24)
    fill = fill or style.key_fill
    draw.rounded_rectangle((x0, y0 + shadow, x1 - 1, y1 - 1), radius, fill=(0, 0, 0, 90))
    outline = {}
    if style.key_style == "outline" and fill is style.key_fill:
        outline = {"outline": _text_colour(fill), "width": max(1, (y1 - y0) // 30)}
    draw.rounded_rectangle((x0, y0, x1 - 1, y1 - 1 - shadow), radius, fill=fill, **outline)
    if not label:
        return None
    size = round((y1 - y0) * 0.42)
    width = _font(style.font, size).getlength(label)
    if width > (x1 - x0) * 0.8:  # long labels shrink to fit the key
        size = round(size * (x1 - x0) * 0.8 / width)
    font = _font(style.font, max(8, size))
    centre = ((x0 + x1) / 2, (y0 + y1 - shadow) / 2)
    draw.text(centre, label, font=font, fill=_text_colour(fill), anchor="mm")
    return draw.textbbox(centre, label, font=font, anchor="mm")


def key_image(style: SkinStyle, size: tuple[int, int], label: str = "", fill=None) -> Image.Image:
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw_key(style, ImageDraw.Draw(image), (0, 0, *size), label, fill)
    return image


def ninepatch_key(style: SkinStyle, size: tuple[int, int], label: str = "", fill=None) -> Image.Image:
    """A key drawn small with a 9-patch border: the bands between the corners and the label stretch."""
    width, height = size
    content = Image.new("RGBA", size, (0, 0, 0, 0))
    label_box = draw_key(style, ImageDraw.Draw(content), (0, 0, width, height), label, fill)
    radius = max(2, round(min(size) * style.radius))
    shadow = max(1, height // 24)

    def ranges(lo: int, hi: int, label_lo: float | None, label_hi: float | None) -> list[tuple[int, int]]:
        if label_lo is None:
            return [(lo, hi)]
        parts = [(lo, min(hi, int(label_lo) - 1)), (max(lo, int(label_hi) + 2), hi)]
        return [(a, b) for a, b in parts if b > a] or [(lo, hi)]

    lx0, ly0, lx1, ly1 = label_box if label_box else (None,) * 4
    stretch_x = ranges(radius, width - radius, lx0, lx1)
    stretch_y = ranges(radius, height - radius - shadow, ly0, ly1)
    pixels = np.zeros((height + 2, width + 2, 4), np.uint8)
    pixels[1:-1, 1:-1] = np.asarray(content)
    for a, b in stretch_x:
        pixels[0, 1 + a : 1 + b] = (0, 0, 0, 255)
    for a, b in stretch_y:
        pixels[1 + a : 1 + b, 0] = (0, 0, 0, 255)
    pad = radius // 2
    pixels[-1, 1 + pad : 1 + width - pad] = (0, 0, 0, 255)
    pixels[1 + pad : 1 + height - pad, -1] = (0, 0, 0, 255)
    return Image.fromarray(pixels, "RGBA")


def candidate_bar(style: SkinStyle, size: tuple[int, int]) -> Image.Image:
    """The navigation/candidate bar: words large enough to read at a 512-px canvas."""
    width, height = size
    image = Image.new("RGBA", size, style.bar_fill)
    draw = ImageDraw.Draw(image)
    font = _font(style.font, max(10, round(height * 0.42)))
    icon_r = height * 0.22
    draw.ellipse((height * 0.5 - icon_r, height / 2 - icon_r, height * 0.5 + icon_r, height / 2 + icon_r), fill=style.accent)
    slots = len(style.nav_words)
    for i, word in enumerate(style.nav_words):
        x = height + (width - height) * (i + 0.5) / slots
        draw.text((x, height / 2), word, font=font, fill=_text_colour(style.bar_fill), anchor="mm")
    draw.line((0, height - 1, width, height - 1), fill=(0, 0, 0, 60), width=max(1, height // 40))
    return image


def t9_panel(style: SkinStyle, size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    gap = max(2, width // 60)
    for i, label in enumerate(T9_LABELS):
        row, col = divmod(i, 3)
        cell = (
            gap + col * (width - gap) // 3,
            gap + row * (height - gap) // 3,
            (col + 1) * (width - gap) // 3,
            (row + 1) * (height - gap) // 3,
        )
        draw_key(style, draw, cell, label)
    return image


def _letter(style: SkinStyle, ch: str) -> str:
    return ch.lower() if style.lowercase else ch


def letter_keys(style: SkinStyle, size: tuple[int, int]) -> Image.Image:
    """Three rows of letter keys (shift and delete at the ends of the last row), transparent between keys."""
    width, height = size
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    key_w, row_h = width / 10, height / 3
    gap = max(2, round(key_w * 0.08))
    for row, letters in enumerate(LETTER_ROWS):
        offset = (10 - len(letters)) * key_w / 2 if row < 2 else 1.5 * key_w
        y0, y1 = round(row * row_h + gap), round((row + 1) * row_h - gap)
        for i, ch in enumerate(letters):
            x0 = round(offset + i * key_w + gap / 2)
            draw_key(style, draw, (x0, y0, round(x0 + key_w - gap), y1), _letter(style, ch))
        if row == 2:
            draw_key(style, draw, (round(gap / 2), y0, round(1.5 * key_w - gap / 2), y1), style.labels["key_shift"])
            draw_key(style, draw, (round(8.5 * key_w + gap / 2), y0, round(width - gap / 2), y1), style.labels["key_delete"])
    return image


def function_row(style: SkinStyle, size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    keys = (("key_num", 1.5), ("key_switch_lang", 1.2), ("key_comma", 1.0), ("key_space", 3.6), ("key_period", 1.0), ("key_enter", 1.7))
    unit = width / sum(w for _, w in keys)
    gap = max(2, round(unit * 0.08))
    x = 0.0
    for key, w in keys:
        fill = style.accent if key == "key_enter" else None
        draw_key(style, draw, (round(x + gap / 2), gap, round(x + w * unit - gap / 2), height - gap), style.labels[key], fill)
        x += w * unit
    return image


def preview(style: SkinStyle, size: tuple[int, int]) -> Image.Image:
    """The whole keyboard as the IME shows it: background, candidate bar, letter rows, function row."""
    width, height = size
    bar_h, letters_h = round(height * 0.14), round(height * 0.62)
    image = draw_background(style, size).convert("RGBA")
    image.alpha_composite(candidate_bar(style, (width, bar_h)))
    image.alpha_composite(letter_keys(style, (width, letters_h)), (0, bar_h))
    image.alpha_composite(function_row(style, (width, height - bar_h - letters_h)), (0, bar_h + letters_h))
    return image.convert("RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def package_files(rng: random.Random, font: str, ninepatch_fraction: float, picture_fraction: float) -> dict[str, bytes]:
    """File name -> bytes for one package."""
    style = SkinStyle(rng, font, picture_fraction)
    naming = rng.choice(NAMING)
    scale = rng.choice((0.5, 0.75, 1.0))

    def px(w: float, h: float) -> tuple[int, int]:
        return max(4, round(w * scale)), max(4, round(h * scale))

    images: dict[str, Image.Image] = {
        "candidate_bar": candidate_bar(style, px(BASE, 128)),
        "keyboard_bg": draw_background(style, px(BASE, 768)),
        "key_9_bg": t9_panel(style, px(496, 416)),
        "letter_keys": letter_keys(style, px(BASE, 640)),
        "function_row": function_row(style, px(BASE, 240)),
        "preview": preview(style, px(1080, 675)),
    }
    ninepatch_ids = set()
    key_sizes = {"key_26_bg": (144, 208), "key_space": (416, 208), "key_enter": (240, 208), "key_num": (224, 208)}
    for key in ("key_26_bg", *KEY_LABELS):
        if key in OPTIONAL_KEYS and rng.random() < 0.15:
            continue
        label = style.labels.get(key, "")
        fill = style.accent if key == "key_enter" else None
        width, height = key_sizes.get(key, (160, 208))
        if rng.random() < ninepatch_fraction:
            # Drawn smaller than its box, as 9-patches are; a labelled key keeps a label that reads at 512 px.
            shrink = 0.6 if label else 0.3
            images[key] = ninepatch_key(style, px(width * shrink, height * shrink), label, fill)
            ninepatch_ids.add(key)
        else:
            images[key] = key_image(style, px(width, height), label, fill)
    files = {
        f"{naming[key]}{'.9' if key in ninepatch_ids else ''}.png": _png(image) for key, image in images.items()
    }
    files["theme.ini"] = f"[theme]\nname=synthetic {rng.randrange(10**6)}\ndark={int(style.dark)}\n".encode()
    return files


def write_package(out_dir: Path, name: str, files: dict[str, bytes], as_zip: bool, top_folder: bool) -> Path:
    # A rerun with other fractions may turn a folder package into a zip or back; keep one form per name.
    other_form = out_dir / (name if as_zip else f"{name}.zip")
    if other_form.is_dir():
        shutil.rmtree(other_form)
    else:
        other_form.unlink(missing_ok=True)
    if as_zip:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for file_name in sorted(files):
                info = zipfile.ZipInfo(f"{name}/{file_name}" if top_folder else file_name, date_time=(2024, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                archive.writestr(info, files[file_name])
        return atomic_write_bytes(out_dir / f"{name}.zip", buffer.getvalue())
    with AtomicDirectory(out_dir / name) as tmp:
        for file_name, data in sorted(files.items()):
            (tmp / file_name).write_bytes(data)
    return out_dir / name


def make_synthetic_skins(
    out_dir: str | Path,
    n: int = 8,
    seed: int = 0,
    zip_fraction: float = 0.25,
    ninepatch_fraction: float = 0.5,
    font: str | Path | None = None,
    picture_fraction: float = 0.5,
) -> list[Path]:
    """Write ``n`` packages into ``out_dir``; returns their paths (folders or .zip files)."""
    font_path = str(find_cjk_font(font))
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SkingenError(f"--out {out_dir}: exists and is not a folder")
    written = []
    for index in range(n):
        rng = random.Random(f"skingen-synthetic-skin:{seed}:{index}")
        files = package_files(rng, font_path, ninepatch_fraction, picture_fraction)
        as_zip = rng.random() < zip_fraction
        written.append(write_package(out_dir, f"skin_{index:04d}", files, as_zip, top_folder=rng.random() < 0.5))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.format == "bds":
        Path(args.out).mkdir(parents=True, exist_ok=True)
        font = str(find_cjk_font(args.font))
        paths = [write_synthetic_bds(Path(args.out), index, args.seed, font) for index in range(args.n)]
        print(f"wrote {len(paths)} Baidu skin packages to {args.out} ({sum(p.suffix == '.bds' for p in paths)} as .bds)")
        return
    paths = make_synthetic_skins(
        args.out, args.n, args.seed, args.zip_fraction, args.ninepatch_fraction, args.font, args.picture_fraction
    )
    zipped = sum(p.suffix == ".zip" for p in paths)
    print(f"wrote {len(paths)} skin packages to {args.out} ({zipped} as .zip)")


if __name__ == "__main__":
    run_cli(main)
