"""Skin packages built like real Android keyboard themes (AOSP LatinIME / AnySoftKeyboard file naming), generated
here so no binary is committed.

Each theme has what real themes have: ``res/drawable-{mdpi,hdpi,xhdpi,xxhdpi}/`` folders with the same
drawable at several densities, key-type 9-patch backgrounds (``btn_keyboard_key_normal.9.png``,
``btn_keyboard_key_dark_*``) in normal/pressed/on/off states, ``sym_keyboard_*`` icons drawn on top of them,
a ``<selector>`` XML that points at the PNG states, and per theme:

- ``dark``: fully transparent keys with white icons over a dark keyboard background given as a thin plain
  strip (1x400, a vertical gradient);
- ``semi``: semi-transparent white keys (alpha 80), the keyboard background a 2x200 9-patch gradient strip with
  fixed top and bottom bands;
- ``light``: opaque keys, the keyboard background an EXIF-rotated JPEG (orientation 6), a 16-bit greyscale
  space-bar icon, and the suggestion strip an XML ``<shape>`` (gradient + corners).

Pressed/on/active variants are pure red and other densities' files carry their density in the key's border
colour, so a wrong choice shows in the pixels as well as in the merge record.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from skingen.skins.ninepatch import encode_ninepatch

DENSITY_SCALE = {"mdpi": 1.0, "hdpi": 1.5, "xhdpi": 2.0, "xxhdpi": 3.0}
ICON_DENSITIES = ("mdpi", "hdpi", "xhdpi")  # icons stop at xhdpi, key backgrounds go to xxhdpi
PRESSED = (255, 0, 0)
BACKGROUND_DARK = (30, 32, 40)
THEMES = ("dark", "semi", "light")
ICONS = ("shift", "delete", "return", "space", "smiley", "language_switch")
BORDER_BY_DENSITY = {"mdpi": (0, 0, 255), "hdpi": (0, 255, 0), "xhdpi": (255, 0, 255), "xxhdpi": (0, 200, 200)}
KEY_FILL = {"dark": (255, 255, 255, 0), "semi": (255, 255, 255, 80), "light": (235, 235, 240, 255)}
DARK_KEY_FILL = {"dark": (0, 0, 0, 0), "semi": (200, 200, 255, 80), "light": (170, 175, 190, 255)}
ICON_COLOUR = {"dark": (255, 255, 255), "semi": (255, 255, 255), "light": (40, 40, 48)}
SPACE_GREY_16BIT = 40000  # a 16-bit grey (40000/65535 -> 156 in 8 bits); an opener that clips makes it white


def _key_ninepatch(fill, border, scale: float) -> Image.Image:
    """A rounded key 20x24 (mdpi) with a 1-px coloured border ring; the middle band stretches."""
    width, height = round(20 * scale), round(24 * scale)
    radius = round(4 * scale)
    content = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(content)
    draw.rounded_rectangle((0, 0, width - 1, height - 1), radius, fill=fill, outline=(*border, 255))
    stretch_x = ((radius + 1, width - radius - 1),)
    stretch_y = ((radius + 1, height - radius - 1),)
    return encode_ninepatch(content, stretch_x, stretch_y, (radius, radius, radius, radius))


def _icon(colour, scale: float, kind: str) -> Image.Image:
    size = round(16 * scale)
    icon = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    inset = max(1, size // 8)
    if kind == "shift":
        draw.polygon([(size / 2, inset), (size - inset, size / 2), (inset, size / 2)], fill=(*colour, 255))
        draw.rectangle((size * 0.35, size / 2, size * 0.65, size - inset), fill=(*colour, 255))
    elif kind == "smiley":
        draw.ellipse((inset, inset, size - inset, size - inset), outline=(*colour, 255), width=max(1, size // 10))
    else:
        draw.rectangle((inset, size * 0.4, size - inset, size * 0.6), fill=(*colour, 255))
    return icon


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _background_strip(theme: str) -> tuple[str, bytes]:
    if theme == "dark":  # a 1x400 plain vertical gradient: thin strips are common as backgrounds
        ramp = np.linspace(0, 1, 400)[:, None, None]
        top, bottom = np.array(BACKGROUND_DARK, float), np.array((10, 10, 14), float)
        strip = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
        return "res/drawable/keyboard_background.png", _png(Image.fromarray(strip, "RGB"))
    if theme == "semi":  # a 2x200 9-patch: a blue-to-black gradient, only rows 40..160 stretch
        ramp = np.linspace(0, 1, 200)[:, None, None]
        pixels = np.concatenate([(np.array((20, 40, 160), float) * (1 - ramp)), np.full((200, 1, 1), 255.0)], -1)
        content = Image.fromarray(np.repeat(pixels, 2, axis=1).astype(np.uint8), "RGBA")
        return "res/drawable/keyboard_background.9.png", _png(encode_ninepatch(content, ((0, 2),), ((40, 160),)))
    # light: an upright 300x200 image, red top half and white bottom half, stored rotated with EXIF orientation 6
    upright = Image.new("RGB", (300, 200), (250, 250, 250))
    ImageDraw.Draw(upright).rectangle((0, 0, 299, 99), fill=(220, 30, 30))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 = rotate 90 clockwise on display
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return "res/drawable-nodpi/keyboard_background.jpg", buffer.getvalue()


SHAPE_XML = """<?xml version="1.0" encoding="utf-8"?>
<shape xmlns:android="http://schemas.android.com/apk/res/android" android:shape="rectangle">
    <gradient android:startColor="#FF2060C0" android:endColor="#FF80C0FF" android:angle="270"/>
    <corners android:radius="6dp"/>
</shape>
"""

SELECTOR_XML = """<?xml version="1.0" encoding="utf-8"?>
<selector xmlns:android="http://schemas.android.com/apk/res/android">
    <item android:state_pressed="true" android:drawable="@drawable/btn_keyboard_key_pressed"/>
    <item android:drawable="@drawable/btn_keyboard_key_normal"/>
</selector>
"""


def theme_files(theme: str) -> dict[str, bytes]:
    """Relative path -> bytes of one theme package."""
    files: dict[str, bytes] = {}
    for density, scale in DENSITY_SCALE.items():
        folder = f"res/drawable-{density}"
        border = BORDER_BY_DENSITY[density]
        files[f"{folder}/btn_keyboard_key_normal.9.png"] = _png(_key_ninepatch(KEY_FILL[theme], border, scale))
        files[f"{folder}/btn_keyboard_key_pressed.9.png"] = _png(_key_ninepatch((*PRESSED, 255), PRESSED, scale))
        files[f"{folder}/btn_keyboard_key_dark_normal.9.png"] = _png(
            _key_ninepatch(DARK_KEY_FILL[theme], border, scale)
        )
        for state in ("pressed", "on"):
            files[f"{folder}/btn_keyboard_key_dark_{state}.9.png"] = _png(
                _key_ninepatch((*PRESSED, 255), PRESSED, scale)
            )
        files[f"{folder}/btn_keyboard_key_dark_off.9.png"] = _png(_key_ninepatch((*PRESSED, 120), PRESSED, scale))
        if density in ICON_DENSITIES:
            for kind in ICONS:
                files[f"{folder}/sym_keyboard_{kind}.png"] = _png(_icon(ICON_COLOUR[theme], scale, kind))
            files[f"{folder}/sym_keyboard_shift_locked.png"] = _png(_icon(PRESSED, scale, "shift"))
    files["res/drawable/btn_keyboard_key.xml"] = SELECTOR_XML.encode()
    name, data = _background_strip(theme)
    files[name] = data
    if theme == "light":
        files["res/drawable/keyboard_suggest_strip.xml"] = SHAPE_XML.encode()
        grey = Image.fromarray(np.full((32, 32), SPACE_GREY_16BIT, np.uint16))  # mode I;16
        files["res/drawable-xhdpi/sym_keyboard_space.png"] = _png(grey)
    else:
        strip = Image.new("RGBA", (8, 40), (*BACKGROUND_DARK, 255))
        files["res/drawable-hdpi/keyboard_suggest_strip.9.png"] = _png(encode_ninepatch(strip, ((2, 6),), ((2, 38),)))
    files["AndroidManifest.xml"] = b'<manifest package="com.example.theme"/>'
    return files


def write_theme(folder: Path, theme: str) -> Path:
    for relpath, data in theme_files(theme).items():
        path = folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def write_themes(packages_dir: Path) -> list[Path]:
    return [write_theme(packages_dir / f"theme_{theme}", theme) for theme in THEMES]
