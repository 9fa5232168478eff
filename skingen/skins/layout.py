"""Layout specs (``configs/layouts/*.yaml``): where each skin element goes on the training canvas.

A spec gives the canvas size its boxes are written in (``canvas``, pixels, or ``units: fraction``
for boxes as fractions of the canvas; any aspect ratio, e.g. 1024x640 for a whole keyboard), the canvas
widths it may be rendered at (``resolutions``; boxes scale with the width), a background colour, and per
element: ``id``, ``box`` ``[x0, y0, x1, y1]`` (x1/y1 exclusive), ``z`` (drawing order, low first), ``fit``
(``stretch``, ``contain``, ``cover``, ``nine_patch`` or ``icon``: native size centred, only scaled down),
``patterns`` (file-name globs that find it in a package, tried in order; an element map or a package's
``skin.yaml`` may name its files instead, see :mod:`skingen.skins.element_maps`), ``required``, ``split_name``
(the file ``--split`` writes it back to when the package's own name is not known), and optionally
``backdrop`` (the id of an element, e.g. the keyboard background, drawn under this one in its box, so
transparent keys look as on the device), ``fallback_fit`` (how a plain image in a ``nine_patch`` box is
fitted; without it, it is stretched with a warning), ``insets`` (``[left, top, right, bottom]`` fixed margins:
the stretch markers ``--split`` writes for a generated atlas) and ``corner_radius`` (the alpha shape
``--split`` gives a generated tile).

From a spec: draw the layout template (the shared conditioning image); merging a package into one atlas image
and cutting an atlas back into a package along a spec live in :mod:`skingen.skins.atlas`.

``merge_elements.py`` records the resolved spec it merged with in the dataset folder (``layout.json``,
:meth:`Layout.to_dict`); :func:`load_layout` reads that record back too, so later stages draw exactly the
boxes the images were merged with, whatever happened to the YAML since.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath

import yaml
from PIL import Image, ImageColor, ImageDraw

from ..errors import SkingenError

LAYOUTS_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "layouts"
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


def render_template(layout: Layout, line_width: int = 2) -> Image.Image:
    """The layout template: white outlines of every element box on black, RGB, canvas size."""
    template = Image.new("RGB", layout.size, (0, 0, 0))
    draw = ImageDraw.Draw(template)
    for element in layout.elements:
        x0, y0, x1, y1 = element.box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255), width=line_width)
    return template
