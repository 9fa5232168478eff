"""Android drawables as skin packages hold them: raster images decoded to RGBA, and XML ``<shape>`` drawables.

Every element image goes through :func:`to_rgba`, the RGBA twin of the dataset image opener: EXIF orientation
applied, 16/32-bit grey scaled (not clipped), CMYK, palette, LA and transparent-colour images converted, alpha
kept. XML drawables: ``<shape>`` (rectangle or oval; ``<solid>``, linear/radial ``<gradient>``, ``<corners>``,
``<stroke>``, ``<size>``) is drawn at any size; ``<selector>`` resolves to its normal-state item (a
``@drawable/name`` reference or an inline shape); anything else is a SkingenError naming the file.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ..errors import SkingenError

ANDROID_NS = "{http://schemas.android.com/apk/res/android}"
ACTIVE_STATES = ("state_pressed", "state_checked", "state_selected", "state_focused", "state_activated", "state_on")
SUPERSAMPLE = 4  # shape edges are drawn this much larger and reduced, for smooth rounded corners
_NAMED_COLOURS = {"transparent": (0, 0, 0, 0), "black": (0, 0, 0, 255), "white": (255, 255, 255, 255)}


def to_rgba(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGBA as a viewer shows it (alpha kept; see the module doc for the modes)."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 0..65535 -> 0..255
        elif mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    elif mode == "CMYK":
        image = image.convert("RGB")
    return image.convert("RGBA")


@dataclass(frozen=True)
class ShapeDrawable:
    """A parsed ``<shape>``: drawn at whatever size its box has (it has no pixels of its own)."""

    source: str
    oval: bool
    colours: tuple[tuple[int, int, int, int], ...]  # one (solid) or 2-3 gradient stops
    gradient: str  # "solid", "linear" or "radial"
    angle: float  # linear gradients, degrees counter-clockwise from left->right (Android's convention)
    radius: float  # corner radius in px
    stroke_width: float
    stroke_colour: tuple[int, int, int, int] | None
    size: tuple[int, int] | None  # <size>, px

    def render(self, size: tuple[int, int]) -> Image.Image:
        width, height = max(1, size[0]), max(1, size[1])
        colour = _fill(self, width, height)
        big = (width * SUPERSAMPLE, height * SUPERSAMPLE)
        mask = Image.new("L", big, 0)
        draw = ImageDraw.Draw(mask)
        box = (0, 0, big[0] - 1, big[1] - 1)
        if self.oval:
            draw.ellipse(box, fill=255)
        else:
            draw.rounded_rectangle(box, radius=self.radius * SUPERSAMPLE, fill=255)
        alpha = np.asarray(mask.resize((width, height), Image.Resampling.BOX), np.float32) / 255
        if self.stroke_colour is not None and self.stroke_width > 0:
            ring = Image.new("L", big, 0)
            ring_draw = ImageDraw.Draw(ring)
            stroke = max(1, round(self.stroke_width * SUPERSAMPLE))
            if self.oval:
                ring_draw.ellipse(box, outline=255, width=stroke)
            else:
                ring_draw.rounded_rectangle(box, radius=self.radius * SUPERSAMPLE, outline=255, width=stroke)
            ring_alpha = np.asarray(ring.resize((width, height), Image.Resampling.BOX), np.float32)[..., None] / 255
            stroke_rgba = np.asarray(self.stroke_colour, np.float32)
            colour = colour * (1 - ring_alpha) + stroke_rgba * ring_alpha
        colour[..., 3] *= alpha
        return Image.fromarray(np.clip(np.rint(colour), 0, 255).astype(np.uint8), "RGBA")


@dataclass(frozen=True)
class DrawableRef:
    """``@drawable/name`` from a ``<selector>``: the package file of that name is the element."""

    name: str
    source: str


def _fill(shape: ShapeDrawable, width: int, height: int) -> np.ndarray:
    stops = np.asarray(shape.colours, np.float32)
    if shape.gradient == "solid" or len(stops) == 1:
        return np.broadcast_to(stops[0], (height, width, 4)).copy()
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if shape.gradient == "radial":
        t = np.hypot(xs - width / 2, ys - height / 2) / max(1.0, math.hypot(width, height) / 2)
    else:
        angle = math.radians(shape.angle)
        dx, dy = math.cos(angle), -math.sin(angle)  # Android: 90 degrees runs bottom -> top
        proj = (xs - width / 2) * dx + (ys - height / 2) * dy
        extent = abs(dx) * width / 2 + abs(dy) * height / 2
        t = proj / max(extent, 1e-6) / 2 + 0.5
    t = np.clip(t, 0, 1)[..., None]
    if len(stops) == 2:
        return stops[0] * (1 - t) + stops[1] * t
    first, second = np.clip(t * 2, 0, 1), np.clip(t * 2 - 1, 0, 1)
    return np.where(t <= 0.5, stops[0] * (1 - first) + stops[1] * first, stops[1] * (1 - second) + stops[2] * second)


def parse_colour(value: str | None, where: str) -> tuple[int, int, int, int]:
    """Android colour text: ``#RGB``, ``#ARGB``, ``#RRGGBB``, ``#AARRGGBB`` or ``@android:color/{black,white,transparent}``."""
    text = (value or "").strip()
    if text.startswith("@android:color/") and text.split("/", 1)[1] in _NAMED_COLOURS:
        return _NAMED_COLOURS[text.split("/", 1)[1]]
    if re.fullmatch(r"#[0-9a-fA-F]{3,4}|#[0-9a-fA-F]{6}|#[0-9a-fA-F]{8}", text):
        digits = text[1:]
        if len(digits) in (3, 4):
            digits = "".join(c * 2 for c in digits)
        if len(digits) == 6:
            digits = "ff" + digits
        a, r, g, b = (int(digits[i : i + 2], 16) for i in range(0, 8, 2))
        return r, g, b, a
    raise SkingenError(
        f"{where}: colour {value!r} is not drawn by skingen (use #RRGGBB or #AARRGGBB literals; "
        "@color/ references are not resolved); write the colour into the XML or name a PNG for this element"
    )


def parse_dimension(value: str | None, density: int, where: str) -> float:
    """``12dp``/``12dip``/``12sp`` (scaled by the folder's density / 160) or ``12px`` -> pixels."""
    if value is None:
        return 0.0
    match = re.fullmatch(r"\s*(-?[0-9.]+)\s*(dp|dip|sp|px)?\s*", value)
    if not match:
        raise SkingenError(f"{where}: dimension {value!r} is not a number with dp/sp/px; write e.g. 8dp")
    number, unit = float(match.group(1)), match.group(2) or "px"
    return number if unit == "px" else number * density / 160


def _attr(node: ET.Element, name: str) -> str | None:
    return node.get(ANDROID_NS + name)


def parse_xml_drawable(data: bytes, source: str, density: int = 160) -> ShapeDrawable | DrawableRef:
    """A ``<shape>`` or the normal-state item of a ``<selector>``; any other XML drawable is a clear error."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise SkingenError(f"{source}:{err.position[0]}: not well-formed XML ({err}); fix or remove the file") from None
    if root.tag == "selector":
        return _selector_item(root, source, density)
    if root.tag == "shape":
        return _parse_shape(root, source, density)
    raise SkingenError(
        f"{source}: XML drawable <{root.tag}> is not drawn by skingen (only <shape> with solid/gradient/corners/"
        "stroke, and <selector> of those or of images); export it as a PNG, or name a PNG for this element in "
        "skin.yaml or the element map"
    )


def _selector_item(root: ET.Element, source: str, density: int) -> ShapeDrawable | DrawableRef:
    items = [item for item in root if item.tag == "item"]
    normal = [item for item in items if not any(_attr(item, s) == "true" for s in ACTIVE_STATES)]
    for item in normal or items:
        reference = _attr(item, "drawable")
        if reference and reference.startswith("@drawable/"):
            return DrawableRef(reference.split("/", 1)[1], source)
        shapes = [child for child in item if child.tag == "shape"]
        if shapes:
            return _parse_shape(shapes[0], source, density)
        if reference and reference.startswith("@color/"):
            break
    raise SkingenError(
        f"{source}: <selector> has no normal-state item skingen can draw (an @drawable/ reference or an inline "
        "<shape>); name a PNG for this element in skin.yaml or the element map"
    )


def _parse_shape(root: ET.Element, source: str, density: int) -> ShapeDrawable:
    kind = _attr(root, "shape") or "rectangle"
    if kind not in ("rectangle", "oval"):
        raise SkingenError(f'{source}: <shape android:shape="{kind}"> is not drawn by skingen (rectangle and oval are)')
    colours: tuple = ((0, 0, 0, 0),)
    gradient, angle, radius, stroke_width, stroke_colour, size = "solid", 0.0, 0.0, 0.0, None, None
    for child in root:
        where = f"{source}: <{child.tag}>"
        if child.tag == "solid":
            colours = (parse_colour(_attr(child, "color"), where),)
        elif child.tag == "gradient":
            stops = [_attr(child, k) for k in ("startColor", "centerColor", "endColor")]
            colours = tuple(parse_colour(c, where) for c in stops if c is not None)
            gradient = _attr(child, "type") or "linear"
            if gradient not in ("linear", "radial"):
                raise SkingenError(
                    f"{where}: gradient type {gradient!r} is not drawn by skingen (linear and radial are)"
                )
            angle = float(_attr(child, "angle") or 0)
        elif child.tag == "corners":
            corner_keys = ("topLeftRadius", "topRightRadius", "bottomLeftRadius", "bottomRightRadius")
            corners = [parse_dimension(_attr(child, k), density, where) for k in corner_keys if _attr(child, k)]
            uniform = parse_dimension(_attr(child, "radius"), density, where)
            radius = max(corners) if corners else uniform  # per-corner radii are drawn as one (the largest)
        elif child.tag == "stroke":
            stroke_width = parse_dimension(_attr(child, "width"), density, where)
            stroke_colour = parse_colour(_attr(child, "color"), where)
        elif child.tag == "size":
            w = parse_dimension(_attr(child, "width"), density, where)
            h = parse_dimension(_attr(child, "height"), density, where)
            size = (max(1, round(w)), max(1, round(h))) if w and h else None
    return ShapeDrawable(source, kind == "oval", colours, gradient, angle, radius, stroke_width, stroke_colour, size)
