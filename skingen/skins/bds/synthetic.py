"""Synthetic Baidu skin packages (``.bds`` zips or folders) for tests and the demo, byte-identical per seed.

Each package has a 26-key pinyin keyboard (portrait and landscape) and a 9-key one with a list panel: letter
sprites (with a digit in the corner of the top row, placed by ``[OFFSETn]``), 9-slice key backgrounds (``INNER_RECT``
inside ``SOURCE_RECT``), icon sprites, text styles (``SHOW`` strings), a candidate bar file with anchored icons,
and a ``demo.png`` drawn directly from the same geometry (not through the reader), so rendering a package back
and comparing with it measures the reader. Text files are UTF-8 with a BOM or, for some packages, GBK.
"""

from __future__ import annotations

import colorsys
import functools
import io
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ...fileio import AtomicDirectory
from .archive import write_bds
from .ini import format_ini
from .resources import pack_sheet, til_sections

LETTER_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
T9_LABELS = ("分词", "ABC", "DEF", "GHI", "JKL", "MNO", "PQRS", "TUV", "WXYZ")
LIST_NAMES = ("，", "。", "？", "！")
PORT_SIZE, LAND_SIZE, BAR = (360, 240), (640, 200), 36
RADIUS = 6
# style ids
PANEL, BAR_BG, KEY_BG, FUNC_BG, TEXT, SMALL_TEXT, LIST_BG, LOGO, HIDE = "1", "2", "10", "11", "70", "71", "80", "90", "91"
ICONS = {"shift": "60", "delete": "61", "enter": "62", "space": "63"}


@dataclass
class KeySpec:
    rect: tuple[int, int, int, int]
    role: str  # letter, text, or an icon name
    values: dict[str, str]
    digit: str = ""


@dataclass
class Look:
    font: str
    bg: tuple[int, int, int]
    bar: tuple[int, int, int]
    key: tuple[int, int, int]
    func: tuple[int, int, int]
    ink: tuple[int, int, int, int]
    sprites: dict[str, list] = field(default_factory=dict)


def _hsv(h, s, v):
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def make_look(rng: random.Random, font: str) -> Look:
    hue, dark = rng.random(), rng.random() < 0.5
    base = 0.22 if dark else 0.85
    ink = (245, 245, 245, 255) if dark else (30, 30, 36, 255)
    return Look(font, _hsv(hue, 0.5, base), _hsv(hue + 0.05, 0.4, base + (0.1 if dark else -0.08)),
                _hsv(hue, 0.25, base + (0.2 if dark else 0.12)), _hsv(hue + 0.5, 0.45, base + (0.12 if dark else -0.2)), ink)  # fmt: skip


@functools.lru_cache(maxsize=32)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def key_background(fill, size) -> Image.Image:
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    border = tuple(max(0, c - 40) for c in fill)
    ImageDraw.Draw(image).rounded_rectangle((0, 0, size[0] - 1, size[1] - 1), RADIUS, fill=(*fill, 255), outline=(*border, 255), width=2)
    return image


def panel_background(look: Look, size) -> Image.Image:
    image = Image.new("RGBA", size, (*look.bg, 255))
    draw = ImageDraw.Draw(image)
    for y in range(0, size[1], 12):
        draw.line((0, y, size[0], y), fill=tuple(min(255, c + 8) for c in look.bg) + (255,), width=1)
    return image


def glyph(look: Look, text: str, size: int) -> Image.Image:
    font = _font(look.font, size)
    x0, y0, x1, y1 = font.getbbox(text, anchor="mm")
    image = Image.new("RGBA", (x1 - x0 + 2, y1 - y0 + 2), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((1 - x0, 1 - y0), text, font=font, fill=look.ink, anchor="mm")
    return image


def icon(look: Look, name: str) -> Image.Image:
    image = Image.new("RGBA", (22, 18), (0, 0, 0, 0))
    draw, ink = ImageDraw.Draw(image), look.ink
    if name == "shift":
        draw.polygon([(11, 1), (21, 10), (15, 10), (15, 17), (7, 17), (7, 10), (1, 10)], outline=ink, width=2)
    elif name == "delete":
        draw.polygon([(1, 9), (7, 1), (21, 1), (21, 17), (7, 17)], outline=ink, width=2)
        draw.line((10, 5, 17, 13), fill=ink, width=2)
        draw.line((10, 13, 17, 5), fill=ink, width=2)
    elif name == "enter":
        draw.line((19, 1, 19, 11, 3, 11), fill=ink, width=2)
        draw.polygon([(1, 11), (7, 6), (7, 16)], fill=ink)
    elif name == "space":
        draw.line((2, 10, 2, 15, 20, 15, 20, 10), fill=ink, width=2)
    else:  # logo / hide: a ring and a chevron
        draw.ellipse((3, 1, 19, 17), outline=ink, width=2) if name == "logo" else draw.line((3, 5, 11, 13, 19, 5), fill=ink, width=2)
    return image


def layout_26(size) -> list[KeySpec]:
    width, height = size
    unit, row_h, pad = width / 10, (height - BAR) / 4, 2
    keys = []

    def add(x, y, w, role, digit="", **values):
        keys.append(KeySpec((round(x) + pad, round(y) + pad, round(x + w) - round(x) - 2 * pad, round(row_h) - 2 * pad), role, values, digit))

    for r, letters in enumerate(LETTER_ROWS):
        y = BAR + r * row_h
        x0 = (width - len(letters) * unit) / 2 if r < 2 else 1.5 * unit
        if r == 2:
            add(0, y, 1.5 * unit, "shift", CENTER="F11")
        for i, ch in enumerate(letters):
            add(x0 + i * unit, y, unit, "letter", digit=str((i + 1) % 10) if r == 0 else "", CENTER=ch, UP=str((i + 1) % 10) if r == 0 else "")
        if r == 2:
            add(width - 1.5 * unit, y, 1.5 * unit, "delete", CENTER="F36")
    y = BAR + 3 * row_h
    add(0, y, 1.5 * unit, "text", CENTER="F6", SHOW="123")
    add(1.5 * unit, y, unit, "text", CENTER="，")
    add(2.5 * unit, y, 5 * unit, "space", CENTER="F38")
    add(7.5 * unit, y, unit, "text", CENTER="F15", SHOW="中")
    add(8.5 * unit, y, 1.5 * unit, "enter", CENTER="F39")
    return [KeySpec(k.rect, k.role, {a: b for a, b in k.values.items() if b}, k.digit) for k in keys]


def layout_9(size) -> tuple[list[KeySpec], tuple]:
    width, height = size
    col, row_h, pad = width / 5, (height - BAR) / 4, 2
    keys = []

    def add(c, r, w, h, role, **values):
        x0, y0 = round(c * col) + pad, round(BAR + r * row_h) + pad
        keys.append(KeySpec((x0, y0, round((c + w) * col) + pad - x0 - 2 * pad, round(BAR + (r + h) * row_h) + pad - y0 - 2 * pad), role, values))

    for i, label in enumerate(T9_LABELS):
        add(1 + i % 3, i // 3, 1, 1, "text", CENTER=str(i + 1), SHOW=label)
    add(4, 0, 1, 1, "delete", CENTER="F36")
    add(4, 1, 1, 1, "text", CENTER="F40", SHOW="重输")
    add(4, 2, 1, 2, "enter", CENTER="F39")
    add(0, 3, 1, 1, "text", CENTER="F1", SHOW="符号")
    add(1, 3, 1, 1, "text", CENTER="F6", SHOW="123")
    add(2, 3, 2, 1, "space", CENTER="F38")
    cell_h = round(3 * row_h / len(LIST_NAMES))
    list_spec = (round(col) - 2 * pad, cell_h, pad, BAR + pad)  # cell w, h, x, y
    return keys, list_spec


def _letter_ids():
    return {ch: str(20 + i) for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz")}


def _digit_ids():
    return {str(d): str(50 + d) for d in range(10)}


def key_sections(keys: list[KeySpec]) -> list[tuple[str, dict]]:
    letters, digits = _letter_ids(), _digit_ids()
    sections = []
    for n, key in enumerate(keys, start=1):
        values: dict[str, object] = {"VIEW_RECT": ",".join(map(str, key.rect)), "TOUCH_RECT": ",".join(map(str, key.rect))}
        values["BACK_STYLE"] = KEY_BG if key.role in ("letter", "space") or key.values.get("SHOW") in T9_LABELS else FUNC_BG
        if key.role == "letter":
            values["FORE_STYLE"] = letters[key.values["CENTER"]] + (f",{digits[key.digit]}" if key.digit else "")
            values["POS_TYPE"] = "1" + (",2" if key.digit else "")
        elif key.role == "text":
            values["FORE_STYLE"] = TEXT
        else:
            values["FORE_STYLE"] = ICONS[key.role]
        values.update(key.values)
        sections.append((f"KEY{n}", values))
    return sections


def build_files(rng: random.Random, font: str) -> tuple[dict[str, bytes], Image.Image]:
    """The package's files and its demo image (the 26-key portrait keyboard drawn from the geometry)."""
    look = make_look(rng, font)
    encoding = "gbk" if rng.random() < 0.3 else "utf-8-sig"
    ini = functools.partial(format_ini, encoding=encoding)
    # sprite sheets
    key_sprites = [key_background(look.key, (24, 24)), key_background(tuple(c * 3 // 4 for c in look.key), (24, 24)),
                   key_background(look.func, (24, 24)), key_background(tuple(c * 3 // 4 for c in look.func), (24, 24))]
    inner = (RADIUS + 2, RADIUS + 2, 24 - RADIUS - 2, 24 - RADIUS - 2)
    letters = [glyph(look, ch, 20) for ch in "abcdefghijklmnopqrstuvwxyz"] + [glyph(look, str(d), 9) for d in range(10)]
    icons = [icon(look, name) for name in ("shift", "delete", "enter", "space", "logo", "hide")]
    backgrounds = [panel_background(look, (96, 64)), Image.new("RGBA", (16, 16), (*look.bar, 255))]
    files: dict[str, bytes] = {}
    for sheet, sprites, inners in (("keys", key_sprites, [inner] * 4), ("letter", letters, [None] * 36),
                                   ("icon", icons, [None] * 6), ("bj", backgrounds, [(0, 0, 96, 64), (0, 0, 16, 16)])):  # fmt: skip
        image, rects = pack_sheet(sprites, 128)
        files[f"res/{sheet}.png"] = _png(image)
        stretch = [i if sheet in ("keys", "bj") else (0, 0, 0, 0) for i in inners]
        files[f"res/{sheet}.til"] = ini(til_sections(rects, [s if s != (0, 0, 0, 0) else None for s in stretch]))
        if sheet in ("letter", "icon"):  # fixed-size sprites: an empty INNER_RECT
            files[f"res/{sheet}.til"] = ini([(n, {k: (v if k != "INNER_RECT" else "0,0,0,0") for k, v in d.items()})
                                             for n, d in til_sections(rects, [None] * len(rects))])  # fmt: skip
    colour = "FF{:02X}{:02X}{:02X}".format(*look.ink[:3])
    styles = [(f"STYLE{PANEL}", {"NM_IMG": "bj,1", "HL_IMG": "bj,1"}), (f"STYLE{BAR_BG}", {"NM_IMG": "bj,2"}),
              (f"STYLE{KEY_BG}", {"NM_IMG": "keys,1", "HL_IMG": "keys,2"}), (f"STYLE{FUNC_BG}", {"NM_IMG": "keys,3", "HL_IMG": "keys,4"}),
              (f"STYLE{TEXT}", {"FONT_SIZE": 15, "NM_COLOR": colour, "HL_COLOR": colour}),
              (f"STYLE{SMALL_TEXT}", {"FONT_SIZE": 13, "NM_COLOR": colour}),
              (f"STYLE{LIST_BG}", {"NM_COLOR": "FF{:02X}{:02X}{:02X}".format(*look.func)}),
              (f"STYLE{LOGO}", {"NM_IMG": "icon,5"}), (f"STYLE{HIDE}", {"NM_IMG": "icon,6"})]  # fmt: skip
    styles += [(f"STYLE{sid}", {"NM_IMG": f"letter,{i + 1}"}) for i, sid in enumerate(_letter_ids().values())]
    styles += [(f"STYLE{sid}", {"NM_IMG": f"letter,{27 + int(d)}"}) for d, sid in _digit_ids().items()]
    styles += [(f"STYLE{sid}", {"NM_IMG": f"icon,{i + 1}"}) for i, sid in enumerate(ICONS.values())]
    files["res/default.css"] = ini([("GLOBAL", {"STYLE_NUM": len(styles)}), *styles])
    files["Info.txt"] = "\r\n".join(["Name=合成皮肤", "Author=skingen", "SupportPlatform=A", ""]).encode(encoding)
    files["port/cand.cnd"] = ini([("CAND", {"BACK_STYLE": BAR_BG}),
                                  ("ICON1", {"SIZE": "26,26", "POS": "6,0", "ANCHOR_TYPE": 4, "FORE_STYLE": LOGO, "KEY": "F31", "PERSIST": 1}),
                                  ("ICON2", {"SIZE": "26,26", "POS": "-6,0", "ANCHOR_TYPE": 6, "FORE_STYLE": HIDE, "KEY": "F8", "PERSIST": 3})])  # fmt: skip
    files["land/cand.cnd"] = files["port/cand.cnd"]
    for orientation, size in (("port", PORT_SIZE), ("land", LAND_SIZE)):
        files[f"{orientation}/gen.ini"] = ini([("PANEL", {"SIZE": f"{size[0]},{size[1]}", "BACK_STYLE": PANEL}),
                                               ("CAND", {"VIEW_RECT": f"0,0,{size[0]},{BAR}", "LAYOUT_NAME": "cand", "TYPE": 0}),
                                               ("OFFSET1", {"POS": "0,0"}), ("OFFSET2", {"POS": "11,-9"})])  # fmt: skip
        keys = layout_26(size)
        files[f"{orientation}/py_26.ini"] = ini([("PANEL", {"KEY_NUM": len(keys)}), *key_sections(keys)])
    keys9, (cw, ch, lx, ly) = layout_9(PORT_SIZE)
    files["port/py_9.ini"] = ini([("PANEL", {"KEY_NUM": len(keys9)}), *key_sections(keys9),
                                  ("LIST", {"BACK_STYLE": LIST_BG, "FORE_STYLE": SMALL_TEXT, "CELL_SIZE": f"{cw},{ch}", "POS": f"{lx},{ly}",
                                            "LIST_NUM": len(LIST_NAMES), "LIST_ORDER": 0, "NAMES": " ".join(LIST_NAMES),
                                            "VALUES": " ".join(LIST_NAMES)})])  # fmt: skip
    demo = draw_demo(look, layout_26(PORT_SIZE), key_sprites, letters, icons)
    files["demo.png"] = _png(demo)
    return files, demo


def draw_demo(look: Look, keys: list[KeySpec], key_sprites, letters, icons) -> Image.Image:
    """The 26-key portrait keyboard drawn straight from the geometry (each part at its final size)."""
    canvas = panel_background(look, PORT_SIZE)
    canvas.alpha_composite(Image.new("RGBA", (PORT_SIZE[0], BAR), (*look.bar, 255)), (0, 0))
    for sprite, x in ((icons[4], 6 + 2), (icons[5], PORT_SIZE[0] - 6 - 26 + 2)):
        canvas.alpha_composite(sprite, (x + (26 - 4 - sprite.width) // 2 + 2, (BAR - sprite.height) // 2))
    letter_of = dict(zip("abcdefghijklmnopqrstuvwxyz", letters))
    draw = ImageDraw.Draw(canvas)
    for key in keys:
        x, y, w, h = key.rect
        fill = look.key if key.role in ("letter", "space") else look.func
        canvas.alpha_composite(key_background(fill, (w, h)), (x, y))
        cx, cy = x + w / 2, y + h / 2
        if key.role == "letter":
            sprite = letter_of[key.values["CENTER"]]
            canvas.alpha_composite(sprite, (round(cx - sprite.width / 2), round(cy - sprite.height / 2)))
            if key.digit:
                digit = letters[26 + int(key.digit)]
                canvas.alpha_composite(digit, (round(cx + 11 - digit.width / 2), round(cy - 9 - digit.height / 2)))
        elif key.role == "text":
            text = key.values.get("SHOW") or key.values["CENTER"]
            draw.text((cx, cy), text, font=_font(look.font, 15), fill=look.ink, anchor="mm")
        else:
            sprite = icons[list(ICONS).index(key.role)]
            canvas.alpha_composite(sprite, (round(cx - sprite.width / 2), round(cy - sprite.height / 2)))
    return canvas.convert("RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def write_synthetic_bds(out_dir: Path, index: int, seed: int, font: str, as_zip: bool | None = None) -> Path:
    """Package ``skin_<index>`` as ``.bds`` or a folder (chosen by the seed unless ``as_zip`` says)."""
    rng = random.Random(f"skingen-synthetic-bds:{seed}:{index}")
    files, _ = build_files(rng, font)
    zipped = rng.random() < 0.5 if as_zip is None else as_zip
    name = f"skin_{index:04d}"
    if zipped:
        return write_bds(out_dir / f"{name}.bds", files)
    with AtomicDirectory(out_dir / name) as tmp:
        for relpath, data in sorted(files.items()):
            (tmp / relpath).parent.mkdir(parents=True, exist_ok=True)
            (tmp / relpath).write_bytes(data)
    return out_dir / name
