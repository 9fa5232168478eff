"""Draw one keyboard of a Baidu package as the app shows it at rest, with each key's box and shown string.

Everything is drawn in the package's own design pixels (``[PANEL] SIZE``), then the canvas is scaled to the
asked width (aspect kept): the panel background stretched over the panel, the candidate bar (background and
the icons shown without candidates), the list panel (background, cells, ``NAMES``), then every key at its
``VIEW_RECT``: its ``BACK_STYLE`` sprite filling the rect by its ``INNER_RECT``, each ``FORE_STYLE`` sprite at its
own size centred on the key (shifted by its ``POS_TYPE`` offset), a text style's string in its colour and size.
Normal state only (``NM_IMG``, ``NM_COLOR``).

A key's string is its text style's ``SHOW``, else the key's ``SHOW``, else its ``CENTER`` value when that is
text rather than a function code (``F36``, ``Z+tool_26``...); keys with none get ``""``. Every key, list cell and
bar icon gets a box, so ``box``/``texts`` hold the whole layout and the labelled boxes.
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from ...evaluate.metrics import edge_f1
from ...prep.glyphs import canny_control, find_cjk_font
from .package import BdsPackage, Key, Keyboard
from .resources import Style

RESAMPLE = Image.Resampling.LANCZOS
FUNCTION_VALUE = re.compile(r"^(F\d+|B\d+|S\d+(_\d+)?|Z\+.*)$", re.IGNORECASE)
DEMO_ASPECT_TOLERANCE = 0.03  # demo.png shows this keyboard only when its aspect ratio matches this closely
DEFAULT_TEXT_SHARE = 0.4  # text size as a share of the key height when the style gives no FONT_SIZE


@dataclass
class RenderedKeyboard:
    """The keyboard (RGB), and per drawn item its quad in the image's pixels, its string and what it is."""

    image: Image.Image
    boxes: list[list[list[float]]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    items: list[dict] = field(default_factory=list)
    design_size: tuple[int, int] = (0, 0)


def shown_text(key: Key, text_styles: list[Style]) -> str:
    for style in text_styles:
        if style.show:
            return style.show
    if key.values.get("SHOW"):
        return key.values["SHOW"]
    centre = key.values.get("CENTER", "")
    return "" if FUNCTION_VALUE.match(centre) else centre


@functools.lru_cache(maxsize=8)
def _default_font_path() -> str:
    return str(find_cjk_font())


def _font(package: BdsPackage, style: Style, size: int) -> ImageFont.FreeTypeFont:
    data = package.font(style.font_name)
    if data is not None:
        try:
            return ImageFont.truetype(io.BytesIO(data), size)
        except OSError:
            package.warn(f"{package.where('res/' + style.font_name)}: not a readable font; the default font is used")
    return ImageFont.truetype(_default_font_path(), size)


def _paste(canvas: Image.Image, tile: Image.Image, x: int, y: int) -> None:
    """Alpha-composite ``tile`` with its top-left at (x, y), clipped to the canvas."""
    left, top = max(0, -x), max(0, -y)
    right, bottom = min(tile.width, canvas.width - x), min(tile.height, canvas.height - y)
    if right > left and bottom > top:
        canvas.alpha_composite(tile.convert("RGBA"), dest=(x + left, y + top), source=(left, top, right, bottom))


class _Painter:
    """Draws styles onto the design-size canvas; ``origin`` is where the panel's (0, 0) lies on it."""

    def __init__(self, package: BdsPackage, canvas: Image.Image, origin: tuple[int, int]):
        self.package, self.canvas, self.origin = package, canvas, origin

    def back(self, style_id: str | None, rect, where: str) -> None:
        """A style filling ``rect``: its sprite by the stretch rule (fixed-size ones centred), or its colour."""
        style = self.package.style(style_id, where)
        if style is None:
            return
        x, y, w, h = rect
        x, y = x + self.origin[0], y + self.origin[1]
        if style.normal is not None:
            tile = self.package.sprite(style.normal, style.where).draw((w, h))
            _paste(self.canvas, tile, x + (w - tile.width) // 2, y + (h - tile.height) // 2)
        elif style.colour is not None and not style.is_text:
            _paste(self.canvas, Image.new("RGBA", (w, h), style.colour), x, y)

    def fore(self, style: Style, rect, shift: tuple[int, int], text: str) -> None:
        """A sprite at its own size, or the string, centred on ``rect`` and moved by ``shift``."""
        x, y, w, h = rect
        cx, cy = x + self.origin[0] + w / 2 + shift[0], y + self.origin[1] + h / 2 + shift[1]
        if style.normal is not None:
            sprite = self.package.sprite(style.normal, style.where).image
            _paste(self.canvas, sprite, round(cx - sprite.width / 2), round(cy - sprite.height / 2))
        elif text:
            size = style.font_size or max(6, round(h * DEFAULT_TEXT_SHARE))
            colour = style.colour or (0, 0, 0, 255)
            ImageDraw.Draw(self.canvas).text((cx, cy), text, font=_font(self.package, style, size), fill=colour, anchor="mm")


def render_keyboard(package: BdsPackage, keyboard: Keyboard, width: int | None = None) -> RenderedKeyboard:
    """The keyboard at ``width`` pixels (default: its design width), with boxes and strings (see module doc)."""
    x0, y0, x1, y1 = keyboard.canvas
    design = (x1 - x0, y1 - y0)
    canvas = Image.new("RGBA", design, (0, 0, 0, 255))
    painter = _Painter(package, canvas, (-x0, -y0))
    items: list[tuple[tuple[int, int, int, int], str, dict]] = []
    where = package.where(keyboard.file)

    painter.back(keyboard.back, (0, 0, *keyboard.size), f"{where}: [PANEL]")
    bar = keyboard.candidate_bar
    if bar is not None:
        painter.back(bar.back, bar.rect, bar.where)
        for icon in bar.icons:
            painter.back(icon.back, icon.rect, icon.where)
            fore = package.style(icon.fore, icon.where)
            if fore is not None:
                painter.fore(fore, icon.rect, (0, 0), "")
            items.append((icon.rect, "", {"kind": "icon", "section": icon.section, "key": icon.key}))
    panel = keyboard.list_panel
    if panel is not None:
        painter.back(panel.back, panel.rect, panel.where)
        fore = package.style(panel.fore, panel.where)
        for i, cell in enumerate(panel.cells):
            painter.back(panel.cell, cell, panel.where)
            name = panel.names[i] if i < len(panel.names) else ""
            if fore is not None:
                painter.fore(fore, cell, (0, 0), name)
            value = panel.values[i] if i < len(panel.values) else name
            items.append((cell, name, {"kind": "list", "section": "LIST", "value": value}))
    for key in keyboard.keys:
        painter.back(key.back, key.rect, key.where)
        fores = [package.style(s, key.where) for s in key.fores]
        text = shown_text(key, [s for s in fores if s is not None and s.is_text])
        for style, shift in zip(fores, key.offsets):
            if style is not None:
                painter.fore(style, key.rect, shift, text)
        items.append((key.rect, text, {"kind": "key", "section": key.section, **{k.lower(): v for k, v in key.values.items()}}))

    out_width = width or design[0]
    out_size = (out_width, max(1, round(design[1] * out_width / design[0])))
    image = canvas.convert("RGB")
    if out_size != design:
        image = image.resize(out_size, RESAMPLE)
    sx, sy = out_size[0] / design[0], out_size[1] / design[1]
    result = RenderedKeyboard(image, design_size=design)
    for (x, y, w, h), text, item in items:
        left, top, right, bottom = ((x - x0) * sx, (y - y0) * sy, (x + w - x0) * sx, (y + h - y0) * sy)
        quad = [[round(left, 2), round(top, 2)], [round(right, 2), round(top, 2)],
                [round(right, 2), round(bottom, 2)], [round(left, 2), round(bottom, 2)]]  # fmt: skip
        result.boxes.append(quad)
        result.texts.append(text)
        result.items.append(item)
    return result


def demo_edge_f1(rendered: Image.Image, demo: Image.Image | None) -> float | None:
    """Edge F1 of the rendered keyboard against the package's demo.png scaled to its size, when the demo has the
    keyboard's aspect ratio (else it shows something else, and None)."""
    if demo is None:
        return None
    aspect, demo_aspect = rendered.width / rendered.height, demo.width / demo.height
    if abs(demo_aspect - aspect) > DEMO_ASPECT_TOLERANCE * aspect:
        return None
    background = Image.new("RGB", demo.size, (0, 0, 0))
    background.paste(demo.convert("RGB"), mask=demo.getchannel("A") if demo.mode == "RGBA" else None)
    return float(edge_f1(background.resize(rendered.size, RESAMPLE), canny_control(rendered)))
