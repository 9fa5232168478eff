"""Android 9-patch (``*.9.png``) images: parse the 1-px marker border and stretch only the marked bands.

The border's top and left edges mark, with black ``(0, 0, 0, 255)`` pixels, the columns and
rows that may stretch; the right and bottom edges mark the content (padding) area. Every other
border pixel must be transparent (red ``(255, 0, 0, 255)`` "optical bounds" marks are accepted
and ignored, as Android does). Several stretch ranges on one axis share the extra space in
proportion to their lengths, so an icon between two ranges keeps its size and stays centred.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import SkingenError

NINEPATCH_SUFFIX = ".9.png"
_MARKER = (0, 0, 0, 255)
_OPTICAL_BOUNDS = (255, 0, 0, 255)

Range = tuple[int, int]


@dataclass(frozen=True)
class NinePatch:
    """A parsed 9-patch: ``image`` is the content (border removed), ranges are ``[start, end)`` in its pixels."""

    image: Image.Image
    stretch_x: tuple[Range, ...]
    stretch_y: tuple[Range, ...]
    padding: tuple[int, int, int, int] | None  # left, top, right, bottom; None when the right/bottom edges are unmarked


def is_ninepatch_name(name: str) -> bool:
    return name.lower().endswith(NINEPATCH_SUFFIX)


def _marked_ranges(edge: np.ndarray, source: str, edge_name: str, coords) -> tuple[Range, ...]:
    """Runs of marker pixels along one border edge; any pixel that is neither a marker nor blank is an error."""
    marked = np.all(edge == _MARKER, axis=1)
    blank = (edge[:, 3] == 0) | np.all(edge == _OPTICAL_BOUNDS, axis=1)
    bad = np.flatnonzero(~(marked | blank))
    if bad.size:
        i = int(bad[0])
        x, y = coords(i)
        raise SkingenError(
            f"{source}: malformed 9-patch: {edge_name} border pixel at (x={x}, y={y}) is RGBA{tuple(int(v) for v in edge[i])}; "
            "border pixels must be black (0, 0, 0, 255) markers or fully transparent. "
            "Redraw the border in a 9-patch editor, or rename the file without '.9' to use it as a plain image"
        )
    padded = np.concatenate([[False], marked, [False]]).astype(np.int8)
    changes = np.flatnonzero(np.diff(padded))
    return tuple((int(s), int(e)) for s, e in zip(changes[::2], changes[1::2]))


def parse_ninepatch(image: Image.Image, source: str = "9-patch image") -> NinePatch:
    """Split a 9-patch into content and markers; ``source`` (package/file) goes into error messages."""
    rgba = image.convert("RGBA")
    width, height = rgba.size
    if width < 3 or height < 3:
        raise SkingenError(f"{source}: a 9-patch needs a 1-px marker border around its content, but the image is only {width}x{height}")
    pixels = np.asarray(rgba)
    stretch_x = _marked_ranges(pixels[0, 1:-1], source, "top", lambda i: (i + 1, 0))
    stretch_y = _marked_ranges(pixels[1:-1, 0], source, "left", lambda i: (0, i + 1))
    pad_y = _marked_ranges(pixels[1:-1, -1], source, "right", lambda i: (width - 1, i + 1))
    pad_x = _marked_ranges(pixels[-1, 1:-1], source, "bottom", lambda i: (i + 1, height - 1))
    for ranges, edge in ((stretch_x, "top"), (stretch_y, "left")):
        if not ranges:
            raise SkingenError(
                f"{source}: malformed 9-patch: no stretch marker on the {edge} border; mark at least one "
                f"black (0, 0, 0, 255) pixel there, or rename the file without '.9' to use it as a plain image"
            )
    for ranges, edge in ((pad_y, "right"), (pad_x, "bottom")):
        if len(ranges) > 1:
            raise SkingenError(
                f"{source}: malformed 9-patch: the {edge} border (content padding) must be one unbroken line, "
                f"found {len(ranges)} separate runs at {list(ranges)}"
            )
    content_w, content_h = width - 2, height - 2
    padding = None
    if pad_x or pad_y:
        x0, x1 = pad_x[0] if pad_x else stretch_x[0][:1] + stretch_x[-1][1:]
        y0, y1 = pad_y[0] if pad_y else stretch_y[0][:1] + stretch_y[-1][1:]
        padding = (x0, y0, content_w - x1, content_h - y1)
    content = rgba.crop((1, 1, width - 1, height - 1))
    return NinePatch(image=content, stretch_x=stretch_x, stretch_y=stretch_y, padding=padding)


def _cumulative_split(lengths: list[int], total: int) -> list[int]:
    """Share ``total`` pixels in proportion to ``lengths``, rounding cumulatively so the parts sum exactly."""
    whole = sum(lengths)
    bounds, acc = [0], 0
    for length in lengths:
        acc += length
        bounds.append(round(acc * total / whole) if whole else 0)
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _axis_segments(length: int, ranges: tuple[Range, ...], target: int) -> list[tuple[int, int, int]]:
    """``(src_start, src_end, dst_length)`` along one axis.

    Fixed segments keep their size and stretch segments share what is left; when the target is
    smaller than the fixed segments together, the fixed segments shrink proportionally and the
    stretch segments vanish (as Android draws it).
    """
    segments, pos = [], 0
    for start, end in ranges:
        if start > pos:
            segments.append((pos, start, False))
        segments.append((start, end, True))
        pos = end
    if pos < length:
        segments.append((pos, length, False))
    fixed_total = sum(e - s for s, e, stretchy in segments if not stretchy)
    if target >= fixed_total:
        stretch_idx = [i for i, seg in enumerate(segments) if seg[2]]
        shares = _cumulative_split([segments[i][1] - segments[i][0] for i in stretch_idx], target - fixed_total)
        dst = [e - s for s, e, _ in segments]
        for i, share in zip(stretch_idx, shares):
            dst[i] = share
    else:
        fixed_idx = [i for i, seg in enumerate(segments) if not seg[2]]
        shares = _cumulative_split([segments[i][1] - segments[i][0] for i in fixed_idx], target)
        dst = [0] * len(segments)
        for i, share in zip(fixed_idx, shares):
            dst[i] = share
    return [(s, e, d) for (s, e, _), d in zip(segments, dst)]


def stretch(
    ninepatch: NinePatch | Image.Image,
    size: tuple[int, int],
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """Draw the 9-patch at ``size`` (RGBA): fixed regions copied pixel for pixel, marked bands stretched.

    A plain image (no markers) is resized as a whole.
    """
    width, height = size
    if not isinstance(ninepatch, NinePatch):
        plain = ninepatch.convert("RGBA")
        return plain if plain.size == (width, height) else plain.resize((width, height), resample)
    content = ninepatch.image
    xs = _axis_segments(content.width, ninepatch.stretch_x, width)
    ys = _axis_segments(content.height, ninepatch.stretch_y, height)
    out = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    dy = 0
    for sy0, sy1, dh in ys:
        dx = 0
        for sx0, sx1, dw in xs:
            if dw and dh:
                tile = content.crop((sx0, sy0, sx1, sy1))
                if tile.size != (dw, dh):
                    tile = tile.resize((dw, dh), resample)
                out.paste(tile, (dx, dy))
            dx += dw
        dy += dh
    return out
