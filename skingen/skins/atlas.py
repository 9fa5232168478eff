"""Atlases: merge a skin package into one atlas image along a layout (:func:`compose_package`) and cut an atlas back
into an importable package (:func:`split_atlas`).

Each element's layers are fitted to its box (``stretch``, ``contain``, ``cover``, ``nine_patch``, ``icon``: see
:mod:`skingen.skins.layout`) and composited keeping alpha; the merge records, per element, the file each layer
came from and its 9-patch, which ``--split`` uses to give every element back under its own name and size.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

from ..errors import SkingenError
from ..fileio import AtomicDirectory
from .drawables import ShapeDrawable, to_rgba
from .element_maps import MANIFEST_NAME, ElementMap, Label, manifest_dict
from .layout import RESAMPLE, Element, Layout
from .ninepatch import (
    NinePatch,
    axis_segments,
    encode_ninepatch,
    insets_to_ranges,
    is_ninepatch_name,
    stretch,
    unstretch,
)
from .package import SkinPackage, find_elements, open_package


@dataclass
class Drawn:
    """One layer fitted to its box: the RGBA ``tile`` (box size), where its pixels landed in the box, and the size
    ``--split`` writes the element back at (the source's own pixels: 9-patch content, image size, visible part)."""

    tile: Image.Image
    drawn: tuple[int, int, int, int]
    native: tuple[int, int]


def _centred(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int, int]]:
    tile = Image.new("RGBA", size, (0, 0, 0, 0))
    left, top = (size[0] - image.width) // 2, (size[1] - image.height) // 2
    tile.paste(image, (left, top))
    return tile, (left, top, left + image.width, top + image.height)


def draw_layer(source: Image.Image | NinePatch | ShapeDrawable, fit: str, size: tuple[int, int]) -> Drawn:
    """Fit one element image into a box of ``size``.

    A 9-patch or an XML shape fills its box by its own rules under every fit but ``icon`` (it has no fixed aspect
    ratio); ``icon`` keeps the native size, centred, scaled down only when it does not fit. Plain images: ``stretch``
    and ``nine_patch`` resize to the box, ``contain`` letterboxes, ``cover`` fills and crops (only the visible part
    is resampled, so a 1x2000 strip costs no more than its box).
    """
    width, height = size
    if isinstance(source, ShapeDrawable):
        if fit == "icon" and source.size is not None:
            ratio = min(1.0, width / source.size[0], height / source.size[1])
            icon = source.render((max(1, round(source.size[0] * ratio)), max(1, round(source.size[1] * ratio))))
            tile, drawn = _centred(icon, size)
            return Drawn(tile, drawn, source.size)
        return Drawn(source.render(size), (0, 0, width, height), size)
    if isinstance(source, NinePatch):
        if fit != "icon":
            return Drawn(stretch(source, size, RESAMPLE), (0, 0, width, height), source.image.size)
        source = source.image
    image = source.convert("RGBA")
    if image.size == size:
        return Drawn(image, (0, 0, width, height), image.size)
    if fit in ("stretch", "nine_patch"):
        return Drawn(image.resize(size, RESAMPLE), (0, 0, width, height), image.size)
    if fit == "cover":
        ratio = max(width / image.width, height / image.height)
        seen_w, seen_h = width / ratio, height / ratio
        left, top = (image.width - seen_w) / 2, (image.height - seen_h) / 2
        tile = image.resize(size, RESAMPLE, box=(left, top, left + seen_w, top + seen_h))
        return Drawn(tile, (0, 0, width, height), (max(1, round(seen_w)), max(1, round(seen_h))))
    ratio = min(width / image.width, height / image.height)
    if fit == "icon":
        ratio = min(1.0, ratio)
    scaled_size = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
    scaled = image if scaled_size == image.size else image.resize(scaled_size, RESAMPLE)
    tile, drawn = _centred(scaled, size)
    return Drawn(tile, drawn, image.size)


def fit_image(image: Image.Image | NinePatch | ShapeDrawable, fit: str, size: tuple[int, int]) -> Image.Image:
    """An RGBA tile of exactly ``size``: the element fitted by its fit mode (transparent where it does not reach)."""
    return draw_layer(image, fit, size).tile


@functools.lru_cache(maxsize=16)
def _label_font_path(preferred: str | None) -> str:
    from ..prep.glyphs import find_cjk_font  # only labels need a font; asking fontconfig takes a subprocess, once

    return str(find_cjk_font(preferred))


@functools.lru_cache(maxsize=64)
def _label_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def draw_label(tile: Image.Image, label: Label) -> tuple[int, int, int, int]:
    """Draw ``label`` centred on ``tile`` (in place); returns the ink's box. The font is the label's own file or
    the CJK font :func:`skingen.prep.glyphs.find_cjk_font` finds (labels such as 中/英 need Chinese glyphs)."""
    font_path = _label_font_path(label.font)
    size = max(6, round(tile.height * label.size))
    font = _label_font(font_path, size)
    text_width = font.getlength(label.text)
    if text_width > tile.width * 0.9:
        font = _label_font(font_path, max(6, round(size * tile.width * 0.9 / text_width)))
    centre = (tile.width / 2, tile.height / 2)
    ImageDraw.Draw(tile).text(centre, label.text, font=font, fill=label.colour, anchor="mm")
    return tuple(round(v) for v in ImageDraw.Draw(tile).textbbox(centre, label.text, font=font, anchor="mm"))


def _ninepatch_record(source: Image.Image | NinePatch | ShapeDrawable) -> dict | None:
    if not isinstance(source, NinePatch):
        return None
    return {
        "stretch_x": [list(r) for r in source.stretch_x],
        "stretch_y": [list(r) for r in source.stretch_y],
        "padding": list(source.padding) if source.padding else None,
    }


@dataclass
class Composition:
    """A merged package: the RGB ``image``, the per-element ``placements`` recorded in the row, one warning line
    (or None), and ``alpha``: each element's own coverage in its box (L, canvas size), for ``--split``."""

    image: Image.Image
    placements: list[dict]
    warning: str | None
    alpha: Image.Image
    choices: list[str]
    unused: list[str]


def _element_tile(package: SkinPackage, element: Element, layers, plain_in_ninepatch: list[str]) -> tuple[Image.Image, dict]:
    """An element's layers drawn into one RGBA tile of its box size, and its placement record."""
    record = {"id": element.id, "box": list(element.box), "fit": element.fit}
    tile = Image.new("RGBA", element.size, (0, 0, 0, 0))
    layer_records = []
    main_native = None
    for choice in (layers.background, layers.icon):
        if choice is None:
            continue
        source = package.load_element(choice.source)
        fit = "icon" if choice.role == "icon" else element.fit
        if fit == "nine_patch" and isinstance(source, Image.Image):
            plain_in_ninepatch.append(f"{element.id} ({choice.source})")
            fit = element.fallback_fit or "stretch"
        drawn = draw_layer(source, fit, element.size)
        tile.alpha_composite(drawn.tile)
        layer_records.append({
            "role": choice.role, "source": choice.source, "size": list(package.image_size(choice.source)),
            "ninepatch": _ninepatch_record(source), "xml": isinstance(source, ShapeDrawable),
            "fit": fit, "drawn": list(drawn.drawn), "native": list(drawn.native),
            "chosen": choice.reason, "tie": choice.tie, "candidates": len(choice.others) + 1,
        })  # fmt: skip
        main_native = main_native or drawn.native
    if layers.label is not None:
        ink = draw_label(tile, layers.label)
        layer_records.append({"role": "label", **layers.label.to_dict(), "drawn": list(ink)})
    main = layer_records[0]
    record.update(source=main["source"], size=main["size"], ninepatch=main["ninepatch"], native=list(main_native),
                  layers=layer_records)  # fmt: skip
    return tile, record


def compose_package(package: SkinPackage, layout: Layout, element_map: ElementMap | None = None) -> Composition:
    """Compose a package's elements on the layout's canvas in z-order, keeping alpha (see :class:`Composition`).

    Each element is drawn over its ``backdrop`` element (stretched to its box) when the package has one, so a
    transparent key shows the skin's keyboard background as on the device; then the tile is alpha-composited on
    the canvas. A missing required element raises SkingenError listing what is missing.
    """
    matches = find_elements(package, layout, element_map)
    if matches.missing:
        raise SkingenError(matches.missing_message(package, layout))
    plain_in_ninepatch: list[str] = []
    tiles, records = {}, {}
    for element in layout.elements:
        if element.id in matches.layers:
            tiles[element.id], records[element.id] = _element_tile(package, element, matches.layers[element.id], plain_in_ninepatch)
    canvas = Image.new("RGBA", layout.size, (*layout.background, 255))
    alpha = Image.new("L", layout.size, 0)
    placements = []
    for element in sorted(layout.elements, key=lambda e: e.z):
        if element.id not in tiles:
            continue
        if element.backdrop in tiles:
            canvas.alpha_composite(tiles[element.backdrop].resize(element.size, RESAMPLE), dest=element.box[:2])
            records[element.id]["backdrop"] = element.backdrop
        canvas.alpha_composite(tiles[element.id], dest=element.box[:2])
        alpha.paste(tiles[element.id].getchannel("A"), element.box[:2])
        placements.append(records[element.id])
    warning = None
    if plain_in_ninepatch:
        warning = (
            f"{package.name}: plain image(s) in 9-patch box(es), no stretch markers, fitted by "
            f"fallback_fit or stretched whole: {', '.join(plain_in_ninepatch)}"
        )
    choices = [f"{package.name}:", *matches.choice_lines()]
    return Composition(canvas.convert("RGB"), placements, warning, alpha, choices, matches.extras)


def merge_package(
    package: SkinPackage | str | os.PathLike, layout: Layout, element_map: ElementMap | None = None
) -> tuple[Image.Image, list[dict]]:
    """(RGB atlas, placements) of :func:`compose_package`; a path is opened (and closed) here."""
    if not isinstance(package, SkinPackage):
        with open_package(package) as opened:
            return merge_package(opened, layout, element_map)
    composition = compose_package(package, layout, element_map)
    return composition.image, composition.placements


# ---------------------------------------------------------------------------------------------------------------
# Split: an atlas back into an importable package


def _unblend(rgb: np.ndarray, alpha: np.ndarray, under: np.ndarray) -> np.ndarray:
    """The straight (unpremultiplied) colour that, composited at ``alpha`` over ``under``, gives ``rgb``."""
    a = alpha[..., None].astype(np.float32) / 255
    straight = (rgb.astype(np.float32) - (1 - a) * under.astype(np.float32)) / np.maximum(a, 1 / 255)
    straight = np.where(a > 0, straight, 0)
    return np.clip(np.rint(straight), 0, 255).astype(np.uint8)


def _shape_alpha(element: Element) -> np.ndarray:
    width, height = element.size
    if element.corner_radius <= 0:
        return np.full((height, width), 255, np.uint8)
    big = Image.new("L", (width * 4, height * 4), 0)
    ImageDraw.Draw(big).rounded_rectangle((0, 0, width * 4 - 1, height * 4 - 1), element.corner_radius * 4, fill=255)
    return np.asarray(big.resize((width, height), Image.Resampling.BOX))


def _covered(element: Element, layout: Layout) -> bool:
    """Whether a higher-z element overlaps this one (then the split gives the composite seen in its box)."""
    x0, y0, x1, y1 = element.box
    return any(
        o.z > element.z and o.box[0] < x1 and x0 < o.box[2] and o.box[1] < y1 and y0 < o.box[3]
        for o in layout.elements
        if o is not element
    )


def _split_file_name(element: Element, record: dict | None, used: set[str]) -> str:
    """The package's own file name when it is known and free, else ``split_name`` with the source's extension."""
    stem = element.split_name[: -len(".png")] if element.split_name else element.id
    if record is None:
        return f"{stem}.9.png" if element.insets else element.split_name or f"{element.id}.png"
    source = PurePosixPath(record["source"]).name
    suffix = ".9.png" if is_ninepatch_name(source) else PurePosixPath(source).suffix.lower()
    if suffix == ".xml":
        suffix = ".png"
    own_name = len(record.get("layers", [])) == 1 and not record["layers"][0].get("xml") and source.lower() not in used
    name = source if own_name else f"{stem}{suffix}"
    if name.lower() in used:
        name = f"{element.id}{suffix}"
    return name


def _stretch_bands_in_box(record: dict, size: tuple[int, int]) -> tuple[tuple, tuple]:
    """Where the background 9-patch's stretch bands landed in the box, minus the icon and label areas."""
    ninepatch = record["ninepatch"]
    content_w, content_h = record["native"]
    keep_out = [layer["drawn"] for layer in record["layers"][1:]]
    bands = []
    for axis, (length, ranges, target) in enumerate(
        ((content_w, ninepatch["stretch_x"], size[0]), (content_h, ninepatch["stretch_y"], size[1]))
    ):
        segments = axis_segments(length, tuple(map(tuple, ranges)), target)
        placed, pos = [], 0
        for s0, s1, dst in segments:
            if any(r[0] <= s0 and s1 <= r[1] for r in ranges) and dst > 0:
                placed.append((pos, pos + dst))
            pos += dst
        free = np.zeros(target, bool)
        for a, b in placed:
            free[a:b] = True
        for box in keep_out:
            free[box[axis] : box[axis + 2]] = False
        if not free.any():  # the icon covers every band: it stretches with them rather than no band at all
            for a, b in placed or [(0, target)]:
                free[a:b] = True
        edges = np.flatnonzero(np.diff(np.concatenate([[0], free.astype(np.int8), [0]])))
        bands.append(tuple((int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])))
    return bands[0], bands[1]


def _split_element(tile: Image.Image, element: Element, record: dict | None) -> Image.Image:
    """The element's file content (RGBA, or a 9-patch with its border) from its tile cut out of the atlas."""
    if record is None:
        if element.insets:
            stretch_x, stretch_y = insets_to_ranges(element.size, element.insets)
            return encode_ninepatch(tile, stretch_x, stretch_y, element.insets)
        return tile
    layers = [layer for layer in record["layers"] if layer["role"] != "label"]
    single = len(record["layers"]) == 1
    if record["ninepatch"] and layers[0]["fit"] != "icon":
        ninepatch = record["ninepatch"]
        if single:
            content = unstretch(tile, tuple(record["native"]), ninepatch["stretch_x"], ninepatch["stretch_y"], RESAMPLE)
            return encode_ninepatch(content, ninepatch["stretch_x"], ninepatch["stretch_y"], ninepatch["padding"])
        stretch_x, stretch_y = _stretch_bands_in_box(record, tile.size)
        return encode_ninepatch(tile, stretch_x, stretch_y, None)
    if single and not layers[0].get("xml"):
        x0, y0, x1, y1 = layers[0]["drawn"]
        native = tuple(layers[0]["native"])
        part = tile.crop((x0, y0, x1, y1))
        return part if part.size == native else part.resize(native, RESAMPLE)
    return tile


def split_atlas(
    image: Image.Image | str | os.PathLike,
    layout: Layout,
    out_dir: str | os.PathLike,
    record: list[dict] | None = None,
    alpha: Image.Image | None = None,
    name: str | None = None,
) -> list[Path]:
    """Cut an atlas into an importable package folder ``out_dir`` (written atomically) with a ``skin.yaml``.

    With ``record`` (the row's ``elements`` from merging, e.g. for an atlas generated from that row) each element
    comes back under its source's file name and extension, at its native size (a 9-patch un-stretched to its
    content with its own markers), and elements the package did not have get no file. With ``alpha`` (the
    coverage image merge_elements.py saves in ``masks/``) tiles get their alpha back; else the layout's
    ``corner_radius`` shapes it. Colours are un-blended from what was drawn under the element (its backdrop or
    the canvas colour), so merging the split package gives the atlas back within rounding. An element covered
    by higher-z elements comes back as the composite seen in its box. Without ``record`` every element with a
    ``split_name`` is written at its box size, as a 9-patch where the layout gives ``insets``.
    """
    source = "atlas image"
    if not isinstance(image, Image.Image):
        source = str(image)
        try:
            with Image.open(image) as opened:
                opened.load()
                image = to_rgba(opened)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise SkingenError(f"{source}: not a readable image ({err})") from None
    if image.size != layout.size:
        raise SkingenError(
            f"{source}: image is {image.width}x{image.height} but layout '{layout.name}' at {layout.resolution} px is "
            f"{layout.width}x{layout.height}; pass the matching --resolution (one of {list(layout.resolutions)})"
        )
    atlas = np.asarray(image.convert("RGB"))
    by_id = {r["id"]: r for r in record} if record is not None else None
    out_dir = Path(out_dir)
    written, files, missing, used = [], {}, [], set()
    elements = {e.id: e for e in layout.elements}
    with AtomicDirectory(out_dir) as tmp:
        for element in layout.elements:
            if element.split_name is None and by_id is None:
                continue
            element_record = by_id.get(element.id) if by_id is not None else None
            if by_id is not None and element_record is None:
                missing.append(element.id)
                continue
            x0, y0, x1, y1 = element.box
            rgb = atlas[y0:y1, x0:x1]
            if _covered(element, layout):
                coverage = np.full(rgb.shape[:2], 255, np.uint8)
            elif alpha is not None:
                coverage = np.asarray(alpha.convert("L"))[y0:y1, x0:x1]
            else:
                coverage = _shape_alpha(element)
            backdrop = elements.get(element.backdrop) if element.backdrop else None
            if backdrop is not None and (by_id is None or backdrop.id in by_id):
                bx0, by0, bx1, by1 = backdrop.box
                under = np.asarray(Image.fromarray(atlas[by0:by1, bx0:bx1]).resize(element.size, RESAMPLE))
            else:
                under = np.broadcast_to(np.asarray(layout.background, np.uint8), rgb.shape)
            tile = Image.fromarray(np.dstack([_unblend(rgb, coverage, under), coverage]), "RGBA")
            file_name = _split_file_name(element, element_record, used)
            used.add(file_name.lower())
            content = _split_element(tile, element, element_record)
            if file_name.lower().endswith((".jpg", ".jpeg")):
                content.convert("RGB").save(tmp / file_name, format="JPEG", quality=95)
            else:
                content.save(tmp / file_name, format="WEBP" if file_name.lower().endswith(".webp") else "PNG", **(
                    {"lossless": True} if file_name.lower().endswith(".webp") else {}))
            files[element.id] = file_name
            written.append(out_dir / file_name)
        manifest = manifest_dict(name or out_dir.name, layout.name, files, missing)
        (tmp / MANIFEST_NAME).write_text(yaml.safe_dump(manifest, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return written
