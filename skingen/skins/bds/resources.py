"""A package's styles (``res/default.css``) and sprite sheets (``res/<sheet>.png`` cut by ``res/<sheet>.til``).

A style (``[STYLEn]``) names a sprite for the normal and the pressed state (``NM_IMG`` / ``HL_IMG`` =
``sheet,index``, index counted from 1 over the sheet's ``[IMGn]`` sections), colours (``NM_COLOR`` /
``HL_COLOR``: ``RRGGBB`` or ``AARRGGBB``), a font size and file (``FONT_SIZE``, ``FONT_NAME``) and optionally a
fixed string (``SHOW``). A sprite is its ``SOURCE_RECT`` of the sheet; ``INNER_RECT`` is its stretchable middle:
absent or empty, the sprite keeps its size (centred); equal to the source rect, the whole sprite stretches;
inside it, the borders stay and the middle stretches (nine slices, like an Android 9-patch).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ...errors import SkingenError
from ..drawables import to_rgba
from ..ninepatch import NinePatch, stretch
from .ini import IniFile, Section


@dataclass(frozen=True)
class Sprite:
    """One cut-out: the RGBA image and its stretchable middle ``inner`` (x0, y0, x1, y1 in the sprite's pixels),
    None when it keeps its size. ``sheet`` and ``index`` say where it came from."""

    image: Image.Image
    inner: tuple[int, int, int, int] | None
    sheet: str
    index: int

    def drawable(self) -> Image.Image | NinePatch:
        """A plain image when the whole sprite stretches, a :class:`NinePatch` when only its middle does."""
        x0, y0, x1, y1 = self.inner or (0, 0, *self.image.size)
        if (x0, y0, x1, y1) == (0, 0, *self.image.size):
            return self.image
        return NinePatch(self.image, ((x0, x1),), ((y0, y1),), None)

    def draw(self, size: tuple[int, int]) -> Image.Image:
        """The sprite filling ``size`` by its stretch rule (a fixed-size sprite comes back as is)."""
        if self.inner is None or size == self.image.size:
            return self.image
        return stretch(self.drawable(), size, Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class Style:
    """One ``[STYLEn]`` of default.css."""

    id: str
    where: str
    normal: tuple[str, int] | None = None
    pressed: tuple[str, int] | None = None
    colour: tuple[int, int, int, int] | None = None
    font_size: int | None = None
    font_name: str | None = None
    show: str | None = None

    @property
    def is_text(self) -> bool:
        """A style that draws a string (the key's, or its own SHOW) rather than a sprite."""
        return self.normal is None and (self.font_size is not None or self.show is not None)


def parse_colour(section: Section, key: str) -> tuple[int, int, int, int] | None:
    raw = section.get(key)
    if raw is None:
        return None
    text = raw.split(";")[0].strip().lstrip("#")
    if len(text) == 6:
        text = "FF" + text
    try:
        if len(text) != 8:
            raise ValueError
        a, r, g, b = (int(text[i : i + 2], 16) for i in range(0, 8, 2))
    except ValueError:
        raise SkingenError(f"{section.where(key)}: [{section.name}] {key} must be RRGGBB or AARRGGBB hex, got {raw!r}") from None
    return r, g, b, a


def _image_ref(section: Section, key: str) -> tuple[str, int] | None:
    raw = section.get(key)
    if raw is None or not raw.strip():
        return None
    sheet, comma, index = raw.split(";")[0].rpartition(",")
    if not comma or not sheet.strip() or not index.strip().isdigit() or int(index) < 1:
        raise SkingenError(
            f"{section.where(key)}: [{section.name}] {key} must be 'sheet,index' (a res/<sheet>.png and a sprite "
            f"number from 1), got {raw!r}"
        )
    return sheet.strip(), int(index)


def parse_styles(css: IniFile) -> dict[str, Style]:
    """Every ``[STYLEn]`` of a default.css, by its id (the text after STYLE)."""
    styles = {}
    for name, section in css.sections.items():
        if not name.startswith("STYLE") or name == "STYLE":
            continue
        style_id = name[len("STYLE") :]
        size = section.int("FONT_SIZE")
        if size is not None and size <= 0:
            raise SkingenError(f"{section.where('FONT_SIZE')}: [{name}] FONT_SIZE must be > 0, got {size}")
        styles[style_id] = Style(
            id=style_id, where=f"{css.path}:{section.line}", normal=_image_ref(section, "NM_IMG"),
            pressed=_image_ref(section, "HL_IMG"), colour=parse_colour(section, "NM_COLOR"), font_size=size,
            font_name=section.get("FONT_NAME") or None, show=section.get("SHOW"),
        )  # fmt: skip
    return styles


@dataclass(frozen=True)
class Tile:
    source: tuple[int, int, int, int]
    inner: tuple[int, int, int, int] | None
    where: str


def parse_tiles(til: IniFile) -> list[Tile]:
    """The ``[IMGn]`` sections of a .til in index order (index 1 first)."""
    tiles = []
    numbered = til.numbered("IMG")
    for expected, (number, section) in enumerate(numbered, start=1):
        if number != expected:
            raise SkingenError(
                f"{section.where()}: [IMG{number}] follows [IMG{expected - 1}]; sprites are numbered 1, 2, 3... "
                "without gaps (NM_IMG counts them)"
            )
        source = section.rect("SOURCE_RECT")
        if source is None:
            raise SkingenError(f"{section.where()}: [IMG{number}] has no SOURCE_RECT=x,y,w,h; add it")
        inner = section.ints("INNER_RECT", 4, "x,y,w,h")
        tiles.append(Tile(source, inner if inner and inner[2] > 0 and inner[3] > 0 else None, section.where("SOURCE_RECT")))
    declared = til.get("GLOBAL").int("TILE_NUM") if til.get("GLOBAL") else None
    if declared is not None and declared != len(tiles):
        section = til.get("GLOBAL")
        raise SkingenError(
            f"{section.where('TILE_NUM')}: TILE_NUM={declared} but the file has {len(tiles)} [IMGn] section(s); "
            "make them agree"
        )
    return tiles


def cut_sprites(sheet: Image.Image, tiles: list[Tile], sheet_name: str, sheet_path: str) -> list[Sprite]:
    """The sprites of one sheet; a source rect outside the sheet is an error naming the .til line."""
    sprites = []
    for index, tile in enumerate(tiles, start=1):
        x, y, w, h = tile.source
        if x < 0 or y < 0 or x + w > sheet.width or y + h > sheet.height:
            raise SkingenError(
                f"{tile.where}: SOURCE_RECT={x},{y},{w},{h} lies outside {sheet_path} ({sheet.width}x{sheet.height}); "
                "fix the rectangle or the sheet"
            )
        inner = None
        if tile.inner is not None:
            ix, iy, iw, ih = tile.inner
            inner = (max(0, ix - x), max(0, iy - y), min(w, ix - x + iw), min(h, iy - y + ih))
            if inner[0] >= inner[2] or inner[1] >= inner[3]:
                raise SkingenError(f"{tile.where}: INNER_RECT={ix},{iy},{iw},{ih} lies outside its SOURCE_RECT; fix it")
        sprites.append(Sprite(sheet.crop((x, y, x + w, y + h)), inner, sheet_name, index))
    return sprites


def decode_sheet(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgba(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SkingenError(f"{where}: not a readable image ({err}); replace the sprite sheet") from None


def pack_sheet(images: list[Image.Image], width: int, gap: int = 1) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Images packed into one RGBA sheet in shelves (rows) of at most ``width`` pixels; their x, y, w, h."""
    width = max([width, *(image.width for image in images)])
    rects, x, y, shelf = [], 0, 0, 0
    for image in images:
        if x and x + image.width > width:
            x, y, shelf = 0, y + shelf + gap, 0
        rects.append((x, y, image.width, image.height))
        x, shelf = x + image.width + gap, max(shelf, image.height)
    sheet = Image.new("RGBA", (width, max(1, y + shelf)), (0, 0, 0, 0))
    for image, (x, y, _, _) in zip(images, rects):
        sheet.paste(image.convert("RGBA"), (x, y))
    return sheet, rects


def til_sections(rects: list[tuple[int, int, int, int]], inners: list[tuple[int, int, int, int] | None],
                 use_alpha: int = 1) -> list[tuple[str, dict]]:
    """A .til for packed sprites; ``inners`` are stretch middles in sprite pixels (None: the whole sprite)."""
    sections: list[tuple[str, dict]] = [("GLOBAL", {"TILE_NUM": len(rects), "USE_ALPHA": use_alpha})]
    for index, ((x, y, w, h), inner) in enumerate(zip(rects, inners), start=1):
        ix, iy, ix1, iy1 = inner or (0, 0, w, h)
        sections.append((f"IMG{index}", {"SOURCE_RECT": f"{x},{y},{w},{h}",
                                          "INNER_RECT": f"{x + ix},{y + iy},{ix1 - ix},{iy1 - iy}"}))  # fmt: skip
    return sections


PRESSED_SHADE = 0.8  # a written package's pressed state: its normal sprites darkened


def pressed(sheet: Image.Image) -> Image.Image:
    """The pressed-state sheet of a written package: the same sprites, darkened, alpha kept."""
    pixels = np.asarray(sheet.convert("RGBA")).astype(np.float32)
    return Image.fromarray(np.dstack([np.rint(pixels[..., :3] * PRESSED_SHADE), pixels[..., 3:]]).astype(np.uint8), "RGBA")
