"""Layout specs (``configs/layouts/*.yaml``): where each skin element goes on the training canvas.

A spec gives the canvas size its boxes are written in (``canvas``, pixels, or ``units: fraction``
for boxes as fractions of the canvas; any aspect ratio, e.g. 1024x640 for a whole keyboard), the canvas
widths it may be rendered at (``resolutions``; boxes scale with the width), a background colour, and per
element: ``id``, ``box`` ``[x0, y0, x1, y1]`` (x1/y1 exclusive), ``z`` (drawing order, low first), ``fit``
(``stretch``, ``contain``, ``cover``, ``nine_patch`` or ``icon``: native size centred, only scaled down),
``patterns`` (file-name globs that find it in a package, tried in order; an element map or a package's
``skin.yaml`` may name its files instead, see :mod:`skingen.element_maps`), ``required``, ``split_name``
(the file ``--split`` writes it back to when the package's own name is not known), and optionally
``backdrop`` (the id of an element, e.g. the keyboard background, drawn under this one in its box, so
transparent keys look as on the device), ``fallback_fit`` (how a plain image in a ``nine_patch`` box is
fitted; without it, it is stretched with a warning), ``insets`` (``[left, top, right, bottom]`` fixed margins:
the stretch markers ``--split`` writes for a generated atlas) and ``corner_radius`` (the alpha shape
``--split`` gives a generated tile).

From a spec: merge a package into one atlas image (:func:`compose_package`), cut an atlas back into an
importable package (:func:`split_atlas`), and draw the layout template (the shared conditioning image).

``merge_elements.py`` records the resolved spec it merged with in the dataset folder (``layout.json``,
:meth:`Layout.to_dict`); :func:`load_layout` reads that record back too, so later stages draw exactly the
boxes the images were merged with, whatever happened to the YAML since.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import yaml
from PIL import Image, ImageColor, ImageDraw, ImageFont

from .drawables import ShapeDrawable, to_rgba
from .element_maps import MANIFEST_NAME, ElementMap, Label, manifest_dict
from .errors import SkingenError
from .fileio import AtomicDirectory
from .ninepatch import (
    NinePatch,
    axis_segments,
    encode_ninepatch,
    insets_to_ranges,
    is_ninepatch_name,
    stretch,
    unstretch,
)
from .skins import SkinPackage, find_elements, open_package

LAYOUTS_DIR = Path(__file__).resolve().parent.parent / "configs" / "layouts"
LAYOUT_RECORD = "layout.json"  # the resolved spec merge_elements.py writes into a dataset folder
FITS = ("stretch", "contain", "cover", "nine_patch", "icon")
RESAMPLE = Image.Resampling.LANCZOS

_LAYOUT_KEYS = {"name", "description", "canvas", "units", "resolutions", "background", "elements"}
_ELEMENT_KEYS = {"id", "box", "z", "fit", "patterns", "required", "split_name", "description", "backdrop",
                 "fallback_fit", "insets", "corner_radius"}
_RECORD_KEYS = {"name", "width", "height", "background", "elements", "resolution", "resolutions", "path"}


@dataclass(frozen=True)
class Element:
    id: str
    box: tuple[int, int, int, int]
    z: int = 0
    fit: str = "stretch"
    patterns: tuple[str, ...] = ()
    required: bool = True
    split_name: str | None = None
    backdrop: str | None = None
    fallback_fit: str | None = None
    insets: tuple[int, int, int, int] | None = None
    corner_radius: int = 0

    @property
    def size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return x1 - x0, y1 - y0


@dataclass(frozen=True)
class Layout:
    name: str
    width: int
    height: int
    background: tuple[int, int, int]
    elements: tuple[Element, ...]
    resolution: int
    resolutions: tuple[int, ...]
    path: str

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def to_dict(self) -> dict:
        """The resolved spec (boxes in this canvas's pixels), as written to a dataset's ``layout.json``."""
        data = asdict(self)
        data["background"] = list(self.background)
        data["resolutions"] = list(self.resolutions)
        data["elements"] = [
            {**asdict(e), "box": list(e.box), "patterns": list(e.patterns), "insets": list(e.insets) if e.insets else None}
            for e in self.elements
        ]
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "layout record") -> Layout:
        """The layout a :meth:`to_dict` record describes (e.g. a dataset's ``layout.json``), checked like a spec:
        a broken record is a SkingenError naming ``source``."""
        if not isinstance(data, dict):
            raise SkingenError(f"{source}: a layout record must be a mapping as Layout.to_dict writes it")
        unknown = sorted(set(data) - _RECORD_KEYS)
        missing = sorted({"name", "width", "height", "elements"} - set(data))
        if unknown or missing:
            wrong = [f"unknown key(s) {unknown}"] * bool(unknown) + [f"missing {missing}"] * bool(missing)
            raise SkingenError(
                f"{source}: not a layout record ({', '.join(wrong)}); a record has the keys {sorted(_RECORD_KEYS)} "
                "as merge_elements.py writes them"
            )
        name = _check_name(data["name"], source)
        width, height = _positive_int_pair([data["width"], data["height"]], "width/height", source)
        resolution = data.get("resolution", width)
        resolutions = _check_resolutions(data.get("resolutions", [resolution]), source)
        if resolution != width or resolution not in resolutions:
            raise SkingenError(
                f"{source}: 'resolution' {resolution!r} must equal 'width' ({width}) and be one of {resolutions}"
            )
        path = data.get("path", source)
        if not isinstance(path, str):
            raise SkingenError(f"{source}: 'path' must be the spec's file path, got {path!r}")
        # Boxes are resolved: whole pixels of this canvas, no scaling.
        elements = _parse_elements(data["elements"], source, (width, height), "px", 1.0)
        return cls(
            name=name,
            width=width,
            height=height,
            background=_parse_background(data.get("background", [0, 0, 0]), source),
            elements=elements,
            resolution=resolution,
            resolutions=tuple(resolutions),
            path=path,
        )


def available_layouts() -> list[str]:
    return sorted(p.stem for p in LAYOUTS_DIR.glob("*.yaml"))


def _layout_path(name_or_path: str | os.PathLike) -> Path:
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml", ".json")) or os.sep in text or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise SkingenError(f"--layout {path}: file not found")
        return path
    path = LAYOUTS_DIR / f"{text}.yaml"
    if not path.is_file():
        raise SkingenError(
            f"--layout {text}: no such layout in {LAYOUTS_DIR}; available: {', '.join(available_layouts()) or 'none'} "
            f"(or pass a path to a .yaml spec or a dataset's {LAYOUT_RECORD})"
        )
    return path


def _read_mapping(path: Path) -> dict:
    """A spec (YAML) or a record (JSON, which YAML reads too) as a mapping."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise SkingenError(f"{where}: invalid {kind} ({getattr(err, 'problem', None) or err})") from None
    except UnicodeDecodeError:
        raise SkingenError(f"{path}: not UTF-8 text; save the layout spec as UTF-8") from None
    if not isinstance(data, dict):
        raise SkingenError(f"{path}: a layout spec must be a mapping with 'name', 'canvas' and 'elements'")
    return data


def _check_name(name, source) -> str:
    if not isinstance(name, str) or not name:
        raise SkingenError(f"{source}: 'name' must be a non-empty string")
    return name


def _check_resolutions(resolutions, source) -> list[int]:
    if not (isinstance(resolutions, list) and resolutions and all(isinstance(r, int) and r > 0 for r in resolutions)):
        raise SkingenError(f"{source}: 'resolutions' must be a list of canvas widths in pixels, e.g. [512, 1024]")
    return resolutions


def _positive_int_pair(value, what: str, path: str | Path) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise SkingenError(f"{path}: '{what}' must be [width, height] in positive whole pixels, got {value!r}")
    return value[0], value[1]


def _parse_background(value, path: str | Path) -> tuple[int, int, int]:
    with contextlib.suppress(ValueError):  # an unknown colour name falls through to the message below
        if isinstance(value, str):
            return ImageColor.getrgb(value)[:3]
        if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in value):
            return tuple(value)
    raise SkingenError(f"{path}: 'background' must be [r, g, b] (0-255) or a colour like '#20242a', got {value!r}")


def _parse_element(raw, index: int, path: str | Path, canvas: tuple[int, int], units: str, scale: float) -> Element:
    label = f"{path}: element #{index + 1}"
    if not isinstance(raw, dict):
        raise SkingenError(f"{label}: expected a mapping with id, box, patterns, got {raw!r}")
    element_id = raw.get("id")
    if not isinstance(element_id, str) or not element_id:
        raise SkingenError(f"{label}: missing 'id' (a short name such as key_shift)")
    label = f"{path}: element '{element_id}'"
    unknown = sorted(set(raw) - _ELEMENT_KEYS)
    if unknown:
        raise SkingenError(f"{label}: unknown key(s) {unknown}; allowed: {sorted(_ELEMENT_KEYS)}")

    box = raw.get("box")
    number = (int, float) if units == "fraction" else (int,)
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, number) and not isinstance(v, bool) for v in box)):
        kind = "fractions of the canvas (0..1)" if units == "fraction" else "whole pixels"
        raise SkingenError(f"{label}: 'box' must be [x0, y0, x1, y1] in {kind}, got {box!r}")
    limit_w, limit_h = (1, 1) if units == "fraction" else canvas
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= limit_w and 0 <= y0 < y1 <= limit_h):
        extent = "the unit square [0, 1]" if units == "fraction" else f"the {canvas[0]}x{canvas[1]} canvas"
        raise SkingenError(f"{label}: box {box} is empty or lies outside {extent} (need 0 <= x0 < x1 <= width, same for y)")
    if units == "fraction":
        x0, x1 = x0 * canvas[0], x1 * canvas[0]
        y0, y1 = y0 * canvas[1], y1 * canvas[1]
    scaled = tuple(round(v * scale) for v in (x0, y0, x1, y1))
    if scaled[2] <= scaled[0] or scaled[3] <= scaled[1]:
        raise SkingenError(f"{label}: box {box} shrinks to nothing at this resolution; make it larger")

    fit = raw.get("fit", "stretch")
    if fit not in FITS:
        raise SkingenError(f"{label}: unknown fit {fit!r}; use one of {', '.join(FITS)}")
    z = raw.get("z", 0)
    if not isinstance(z, int) or isinstance(z, bool):
        raise SkingenError(f"{label}: 'z' must be a whole number (drawing order, low first), got {z!r}")
    required = raw.get("required", True)
    if not isinstance(required, bool):
        raise SkingenError(f"{label}: 'required' must be true or false, got {required!r}")
    patterns = raw.get("patterns")
    if not (isinstance(patterns, list) and patterns and all(isinstance(p, str) and p for p in patterns)):
        raise SkingenError(f"{label}: 'patterns' must be a non-empty list of file-name globs, e.g. [\"key_shift*.png\"]")

    split_name = raw.get("split_name")
    if split_name is not None:
        if not isinstance(split_name, str) or PurePosixPath(split_name).name != split_name or split_name in (".", ".."):
            raise SkingenError(f"{label}: 'split_name' must be a plain file name such as key_shift.png, got {split_name!r}")
        if not split_name.lower().endswith(".png"):
            raise SkingenError(f"{label}: 'split_name' {split_name!r} must end in .png (split writes PNG files)")
        if not any(fnmatch.fnmatchcase(split_name.lower(), p.lower()) for p in patterns):
            raise SkingenError(
                f"{label}: split_name {split_name!r} matches none of its patterns {patterns}, so a split package "
                "would not merge back; add a pattern for it"
            )
    fallback_fit = raw.get("fallback_fit")
    if fallback_fit is not None and fallback_fit not in FITS:
        raise SkingenError(f"{label}: unknown fallback_fit {fallback_fit!r}; use one of {', '.join(FITS)}")
    backdrop = raw.get("backdrop")
    if backdrop is not None and (not isinstance(backdrop, str) or backdrop == element_id):
        raise SkingenError(f"{label}: 'backdrop' must be the id of another element (e.g. keyboard_bg), got {backdrop!r}")
    insets = raw.get("insets")
    if insets is not None:
        if not (isinstance(insets, list) and len(insets) == 4 and all(isinstance(v, int) and v >= 0 for v in insets)):
            raise SkingenError(f"{label}: 'insets' must be [left, top, right, bottom] in whole pixels >= 0, got {insets!r}")
        insets = tuple(round(v * scale) for v in insets)
    radius = raw.get("corner_radius") or 0
    if not isinstance(radius, int) or radius < 0:
        raise SkingenError(f"{label}: 'corner_radius' must be whole pixels >= 0, got {radius!r}")
    return Element(
        id=element_id, box=scaled, z=z, fit=fit, patterns=tuple(patterns), required=required, split_name=split_name,
        backdrop=backdrop, fallback_fit=fallback_fit, insets=insets, corner_radius=round(radius * scale),
    )


def _parse_elements(raw_elements, source, canvas: tuple[int, int], units: str, scale: float) -> tuple[Element, ...]:
    if not isinstance(raw_elements, list) or not raw_elements:
        raise SkingenError(f"{source}: 'elements' must be a non-empty list of elements")
    elements = [_parse_element(raw, i, source, canvas, units, scale) for i, raw in enumerate(raw_elements)]
    seen_ids, seen_split = set(), {}
    all_ids = {e.id for e in elements}
    for element in elements:
        if element.id in seen_ids:
            raise SkingenError(f"{source}: element id '{element.id}' is used twice; every element needs its own id")
        seen_ids.add(element.id)
        if element.split_name is not None:
            other = seen_split.setdefault(element.split_name.lower(), element.id)
            if other != element.id:
                raise SkingenError(
                    f"{source}: elements '{other}' and '{element.id}' both split to {element.split_name!r}; "
                    "give each its own split_name"
                )
    for element in elements:
        if element.backdrop is not None and element.backdrop not in all_ids:
            raise SkingenError(f"{source}: element '{element.id}': backdrop '{element.backdrop}' is not an element of this layout")
    return tuple(elements)


def load_layout(name_or_path: str | os.PathLike, resolution: int | None = None) -> Layout:
    """Read and check a layout spec; ``resolution`` (canvas width, one of the spec's ``resolutions``;
    default the first) scales every box.

    A dataset's ``layout.json`` (the record merge_elements.py writes) loads as the layout it records; it holds
    boxes at one size, so ``resolution`` may only name that size.
    """
    path = _layout_path(name_or_path)
    data = _read_mapping(path)
    if "canvas" not in data and {"width", "height"} & set(data):
        layout = replace(Layout.from_dict(data, source=str(path)), path=str(path))
        if resolution is not None and resolution != layout.resolution:
            raise SkingenError(
                f"{path}: this record holds layout '{layout.name}' at {layout.resolution} px only; to draw it at "
                f"{resolution} px pass its YAML spec (e.g. --layout {layout.name})"
            )
        return layout
    unknown = sorted(set(data) - _LAYOUT_KEYS)
    if unknown:
        raise SkingenError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_LAYOUT_KEYS)}")
    name = _check_name(data.get("name", path.stem), path)
    canvas = _positive_int_pair(data.get("canvas"), "canvas", path)
    units = data.get("units", "px")
    if units not in ("px", "fraction"):
        raise SkingenError(f"{path}: 'units' must be 'px' or 'fraction', got {units!r}")
    resolutions = _check_resolutions(data.get("resolutions", [canvas[0]]), path)
    if resolution is None:
        resolution = resolutions[0]
    if resolution not in resolutions:
        raise SkingenError(
            f"{path}: layout '{name}' has no {resolution} px variant; use one of {resolutions} "
            "or add it to the spec's 'resolutions'"
        )
    scale = resolution / canvas[0]
    return Layout(
        name=name,
        width=resolution,
        height=round(canvas[1] * scale),
        background=_parse_background(data.get("background", [0, 0, 0]), path),
        elements=_parse_elements(data.get("elements"), path, canvas, units, scale),
        resolution=resolution,
        resolutions=tuple(resolutions),
        path=str(path),
    )


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
    from .glyphs import find_cjk_font  # only labels need a font; asking fontconfig takes a subprocess, once

    return str(find_cjk_font(preferred))


@functools.lru_cache(maxsize=64)
def _label_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def draw_label(tile: Image.Image, label: Label) -> tuple[int, int, int, int]:
    """Draw ``label`` centred on ``tile`` (in place); returns the ink's box. The font is the label's own file or
    the CJK font :func:`skingen.glyphs.find_cjk_font` finds (labels such as 中/英 need Chinese glyphs)."""
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


def render_template(layout: Layout, line_width: int = 2) -> Image.Image:
    """The layout template: white outlines of every element box on black, RGB, canvas size."""
    template = Image.new("RGB", layout.size, (0, 0, 0))
    draw = ImageDraw.Draw(template)
    for element in layout.elements:
        x0, y0, x1, y1 = element.box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255), width=line_width)
    return template
