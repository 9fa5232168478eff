"""Which package files make up each layout element: element maps (YAML) and per-package manifests (``skin.yaml``).

An element map (``--element_map NAME_OR_YAML``; stock maps in ``configs/element_maps/``) says, per layout
element id, which files are its layers::

    name: android
    elements:
      key_shift:
        background: ["btn_keyboard_key_dark_normal*", "btn_keyboard_key_dark*", "btn_keyboard_key*"]
        icon: ["sym_keyboard_shift*"]
      key_num:
        background: ["btn_keyboard_key_dark*", "btn_keyboard_key*"]
        label: {text: "123", colour: "#ffffff", size: 0.36}

Patterns are case-insensitive globs on the file name; a pattern without a dot matches the drawable name
(the file name without ``.9.png``/``.png``/``.xml``/...), so one pattern finds the PNG, the 9-patch and the XML
form. An element the map does not name uses the layout's own ``patterns`` as its background.

A package may carry a manifest, ``skin.yaml`` at its root, that names its files per element and wins over the
map (``merge_elements.py --split`` writes one)::

    elements:
      key_shift: key_shift.9.png                       # the background alone
      key_enter: {background: res/drawable-xhdpi/btn_keyboard_key_dark_normal.9.png,
                  icon: res/drawable-xhdpi/sym_keyboard_return.png}
    missing: [key_emoji]                               # elements the package does not have

Labels (``text``, ``colour``, ``size`` as a fraction of the box height, optional ``font`` file) are drawn by the
app on a real device, so they come from the map or the manifest, never from an image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from ..errors import SkingenError
from .drawables import parse_colour

ELEMENT_MAPS_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "element_maps"
MANIFEST_NAME = "skin.yaml"
LAYER_ROLES = ("background", "icon")
_MAP_KEYS = {"name", "description", "elements"}
_RULE_KEYS = {"background", "icon", "label", "description"}
_LABEL_KEYS = {"text", "colour", "color", "size", "font"}
_MANIFEST_KEYS = {"name", "skin", "layout", "element_map", "elements", "missing", "description"}


@dataclass(frozen=True)
class Label:
    text: str
    colour: tuple[int, int, int, int] = (255, 255, 255, 255)
    size: float = 0.36  # share of the box height
    font: str | None = None

    def to_dict(self) -> dict:
        r, g, b, a = self.colour
        data = {"text": self.text, "colour": f"#{a:02x}{r:02x}{g:02x}{b:02x}", "size": self.size}
        return {**data, "font": self.font} if self.font else data


@dataclass(frozen=True)
class ElementRule:
    """Where an element's layers come from: file-name patterns (map) or fixed files (manifest)."""

    background: tuple[str, ...] = ()
    icon: tuple[str, ...] = ()
    label: Label | None = None


@dataclass(frozen=True)
class ElementMap:
    name: str
    path: str
    rules: dict[str, ElementRule] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """A package's ``skin.yaml``: files per element (paths relative to the package) and elements it lacks."""

    path: str
    files: dict[str, ElementRule]
    missing: frozenset[str]


def available_element_maps() -> list[str]:
    return sorted(p.stem for p in ELEMENT_MAPS_DIR.glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise SkingenError(f"{where}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    except UnicodeDecodeError:
        raise SkingenError(f"{path}: not UTF-8 text; save the {what} as UTF-8") from None
    except OSError as err:
        raise SkingenError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise SkingenError(f"{path}: a {what} must be a mapping with 'elements'")
    return data


def parse_label(raw, where: str) -> Label:
    if isinstance(raw, str):
        return Label(raw)
    if not isinstance(raw, dict) or not isinstance(raw.get("text"), str) or set(raw) - _LABEL_KEYS:
        raise SkingenError(
            f"{where}: 'label' must be a text or a mapping with text, colour (#RRGGBB), size (share of the box "
            f"height, 0..1) and font (a font file), got {raw!r}"
        )
    colour = raw.get("colour", raw.get("color", "#ffffff"))
    size = raw.get("size", 0.36)
    if not isinstance(size, (int, float)) or isinstance(size, bool) or not 0 < size <= 1:
        raise SkingenError(f"{where}: label 'size' is a share of the box height (0..1], got {size!r}")
    font = raw.get("font")
    if font is not None and not isinstance(font, str):
        raise SkingenError(f"{where}: label 'font' must be a font file path, got {font!r}")
    return Label(raw["text"], parse_colour(str(colour), where), float(size), font)


def _patterns(value, where: str, role: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and value and all(isinstance(p, str) and p for p in value)):
        raise SkingenError(f"{where}: '{role}' must be a file-name glob or a non-empty list of them, got {value!r}")
    return tuple(value)


def _rule(raw, where: str, fixed_files: bool) -> ElementRule:
    if isinstance(raw, str) or (isinstance(raw, list) and not fixed_files):
        return ElementRule(background=_patterns(raw, where, "background"))
    if not isinstance(raw, dict):
        raise SkingenError(f"{where}: expected a file name or a mapping of background/icon/label, got {raw!r}")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise SkingenError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_RULE_KEYS)}")
    layers = {role: _patterns(raw[role], where, role) for role in LAYER_ROLES if role in raw}
    if fixed_files and any(len(v) != 1 for v in layers.values()):
        raise SkingenError(f"{where}: a manifest names one file per layer")
    label = parse_label(raw["label"], where) if "label" in raw else None
    if not layers and label is None:
        raise SkingenError(f"{where}: name at least one of background, icon, label")
    return ElementRule(background=layers.get("background", ()), icon=layers.get("icon", ()), label=label)


def load_element_map(name_or_path: str | os.PathLike) -> ElementMap:
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text):
        path = ELEMENT_MAPS_DIR / f"{text}.yaml"
        if not path.is_file():
            raise SkingenError(
                f"--element_map {text}: no such map in {ELEMENT_MAPS_DIR}; available: "
                f"{', '.join(available_element_maps()) or 'none'} (or pass a path to a .yaml map)"
            )
    elif not path.is_file():
        raise SkingenError(f"--element_map {path}: file not found")
    data = _read_yaml(path, "element map")
    unknown = sorted(set(data) - _MAP_KEYS)
    if unknown:
        raise SkingenError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_MAP_KEYS)}")
    elements = data.get("elements")
    if not isinstance(elements, dict) or not elements:
        raise SkingenError(f"{path}: 'elements' must map layout element ids to their layers")
    rules = {str(k): _rule(v, f"{path}: element '{k}'", fixed_files=False) for k, v in elements.items()}
    return ElementMap(name=str(data.get("name", path.stem)), path=str(path), rules=rules)


def check_map_against_layout(element_map: ElementMap, layout) -> None:
    """A map describes elements of several layouts; one that names no element of this layout is a mistake."""
    if not set(element_map.rules) & {e.id for e in layout.elements}:
        raise SkingenError(
            f"{element_map.path}: names none of the elements of layout '{layout.name}' "
            f"({', '.join(e.id for e in layout.elements)}); fix the ids or pick another layout"
        )


def parse_manifest(text: bytes, path: str, base: str, files: set[str], layout) -> Manifest:
    """A manifest read from a package; ``base`` is its folder inside the package, ``files`` the package's files."""
    try:
        data = yaml.safe_load(text.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise SkingenError(
            f"{where}: invalid skin.yaml ({getattr(err, 'problem', None) or err}); fix or remove it"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("elements", {}), dict):
        raise SkingenError(f"{path}: skin.yaml must be a mapping with 'elements' (element id -> file or layers)")
    unknown = sorted(set(data) - _MANIFEST_KEYS)
    if unknown:
        raise SkingenError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_MANIFEST_KEYS)}")
    ids = {e.id for e in layout.elements}
    resolved: dict[str, ElementRule] = {}
    for element_id, raw in (data.get("elements") or {}).items():
        where = f"{path}: element '{element_id}'"
        if element_id not in ids:
            continue  # a manifest may describe elements another layout uses
        rule = _rule(raw, where, fixed_files=True)
        layers = {}
        for role in LAYER_ROLES:
            for name in getattr(rule, role):
                relpath = str(PurePosixPath(base) / name) if base else name
                if relpath not in files:
                    raise SkingenError(
                        f"{where}: {role} file '{name}' is not in the package; fix the name in skin.yaml"
                    )
                layers[role] = (relpath,)
        resolved[element_id] = ElementRule(**layers, label=rule.label)
    missing = data.get("missing", [])
    if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
        raise SkingenError(f"{path}: 'missing' must be a list of element ids")
    return Manifest(path=path, files=resolved, missing=frozenset(missing) & ids)


def manifest_dict(name: str, layout_name: str, files: dict[str, dict], missing: list[str]) -> dict:
    """What ``--split`` writes as ``skin.yaml``."""
    return {"name": name, "layout": layout_name, "elements": files, "missing": sorted(missing)}
