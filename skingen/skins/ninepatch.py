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

from ..errors import SkingenError

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


def axis_segments(length: int, ranges: tuple[Range, ...], target: int) -> list[tuple[int, int, int]]:
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


def _place_segments(
    source: Image.Image,
    xs: list[tuple[int, int, int]],
    ys: list[tuple[int, int, int]],
    size: tuple[int, int],
    resample: Image.Resampling,
    backwards: bool = False,
) -> Image.Image:
    """Copy or resize each (x segment, y segment) cell of ``source`` into its place in a new RGBA image of ``size``.

    Forwards, a cell goes from its source range to its destination length; ``backwards`` goes the other way
    (destination ranges of ``source`` back to source lengths). Each cell is cut before it is resized, so memory
    stays bounded by the output, however thin the source (a 1x2000 strip stretched to 1024 px is one small cell).
    """
    out = Image.new("RGBA", size, (0, 0, 0, 0))

    def spans(segments):
        spans_, dst_pos = [], 0
        for s0, s1, d in segments:
            spans_.append(((dst_pos, dst_pos + d), (s0, s1)) if backwards else ((s0, s1), (dst_pos, dst_pos + d)))
            dst_pos += d
        return spans_

    for (fy0, fy1), (ty0, ty1) in spans(ys):
        for (fx0, fx1), (tx0, tx1) in spans(xs):
            width, height = tx1 - tx0, ty1 - ty0
            if width <= 0 or height <= 0:
                continue
            if fx1 <= fx0 or fy1 <= fy0:  # a band that vanished: its nearest pixels stand in for it
                fx0, fx1 = min(fx0, source.width - 1), max(min(fx0, source.width - 1) + 1, fx1)
                fy0, fy1 = min(fy0, source.height - 1), max(min(fy0, source.height - 1) + 1, fy1)
            cell = source.crop((fx0, fy0, fx1, fy1))
            if cell.size != (width, height):
                cell = cell.resize((width, height), resample)
            out.paste(cell, (tx0, ty0))
    return out


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
    xs = axis_segments(content.width, ninepatch.stretch_x, width)
    ys = axis_segments(content.height, ninepatch.stretch_y, height)
    return _place_segments(content, xs, ys, (width, height), resample)


def unstretch(
    tile: Image.Image,
    content_size: tuple[int, int],
    stretch_x: tuple[Range, ...],
    stretch_y: tuple[Range, ...],
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """The inverse of :func:`stretch`: a tile drawn from a 9-patch of ``content_size`` back at that size.

    Fixed regions are copied back pixel for pixel and each stretched band is shrunk to its source length, so
    stretching the result again gives the tile back (exactly where the bands are uniform, as bands are).
    """
    xs = axis_segments(content_size[0], tuple(map(tuple, stretch_x)), tile.width)
    ys = axis_segments(content_size[1], tuple(map(tuple, stretch_y)), tile.height)
    return _place_segments(tile.convert("RGBA"), xs, ys, content_size, resample, backwards=True)


def encode_ninepatch(
    content: Image.Image,
    stretch_x: tuple[Range, ...],
    stretch_y: tuple[Range, ...],
    padding: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """A ``*.9.png`` image: ``content`` (RGBA) inside a 1-px border whose black pixels mark the stretch bands
    (top, left) and the content area (bottom, right: ``padding`` = left, top, right, bottom)."""
    width, height = content.size
    pixels = np.zeros((height + 2, width + 2, 4), np.uint8)
    pixels[1:-1, 1:-1] = np.asarray(content.convert("RGBA"))
    pixels[0, :] = pixels[-1, :] = 0
    pixels[:, 0] = pixels[:, -1] = 0
    for a, b in stretch_x:
        pixels[0, 1 + a : 1 + b] = _MARKER
    for a, b in stretch_y:
        pixels[1 + a : 1 + b, 0] = _MARKER
    if padding is not None:
        left, top, right, bottom = padding
        pixels[-1, 1 + left : 1 + width - right] = _MARKER
        pixels[1 + top : 1 + height - bottom, -1] = _MARKER
    return Image.fromarray(pixels, "RGBA")


def insets_to_ranges(size: tuple[int, int], insets: tuple[int, int, int, int]) -> tuple[tuple[Range, ...], tuple[Range, ...]]:
    """Stretch ranges of a tile of ``size`` whose ``insets`` (left, top, right, bottom) stay fixed; the middle
    stretches (at least one pixel on each axis, so the result is always a valid 9-patch)."""
    width, height = size
    left, top, right, bottom = insets
    x0 = min(max(0, left), width - 1)
    y0 = min(max(0, top), height - 1)
    x1 = max(x0 + 1, width - max(0, right))
    y1 = max(y0 + 1, height - max(0, bottom))
    return ((x0, x1),), ((y0, y1),)
