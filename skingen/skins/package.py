"""Skin packages: a folder or a .zip of element images, and finding a layout's elements in one.

An element's layers (a background, an optional icon, an optional label) come from the package's
``skin.yaml`` manifest, else from the element map, else from the layout's own patterns
(:mod:`skingen.skins.element_maps`). Among several files that match a layer's patterns, the choice is:
the earliest pattern, then an image before an XML drawable, then the normal state before
pressed/down/highlight/selected/on/checked (and disabled last), then the densest ``drawable-*dpi``
folder, then the largest image, then the first path; every choice and tie is recorded.

Zip packages are read in memory, never extracted; an entry whose path is absolute or climbs out with
``..`` (zip-slip), or a symbolic link (in a zip or a folder) that points outside the package, makes the
whole package an error.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import posixpath
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from PIL import Image

from ..errors import SkingenError
from .drawables import DrawableRef, ShapeDrawable, parse_xml_drawable, to_rgba
from .element_maps import MANIFEST_NAME, ElementMap, ElementRule, Label, Manifest, parse_manifest
from .ninepatch import NinePatch, is_ninepatch_name, parse_ninepatch

if TYPE_CHECKING:
    from .layout import Element, Layout

ZIP_SUFFIXES = (".zip", ".bds")  # .bds: a Baidu IME skin, a zip (read by skingen.skins.bds)
MAX_ENTRY_BYTES = 256 * 1024 * 1024  # no skin element comes near this; larger entries are zip bombs or mistakes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DRAWABLE_SUFFIXES = (*IMAGE_SUFFIXES, ".xml")
DENSITIES = {"ldpi": 120, "mdpi": 160, "tvdpi": 213, "hdpi": 240, "xhdpi": 320, "xxhdpi": 480, "xxxhdpi": 640}
ACTIVE_STATE_WORDS = {"pressed", "press", "down", "highlight", "highlighted", "selected", "on", "checked",
                      "focused", "active", "hover", "activated", "locked"}  # fmt: skip
DISABLED_STATE_WORDS = {"disabled", "inactive"}
_JUNK_PARTS = ("__MACOSX",)
_DRIVE = re.compile(r"^[A-Za-z]:")
_DENSITY_QUALIFIER = re.compile(r"^(?:drawable|mipmap)(?:-[a-z0-9]+)*?-(ldpi|mdpi|tvdpi|hdpi|xhdpi|xxhdpi|xxxhdpi)(?:-|$)")
_MAX_REFERENCE_DEPTH = 4


def _is_junk(relpath: str) -> bool:
    parts = PurePosixPath(relpath).parts
    return any(p.startswith(".") or p in _JUNK_PARTS for p in parts) or parts[-1] == "Thumbs.db"


def _zip_entry_name(info: zipfile.ZipInfo) -> str:
    """The entry's name; names stored without the UTF-8 flag are tried as GBK (common for Chinese zips)."""
    name = info.filename
    if not info.flag_bits & 0x800:
        with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):  # not GBK either: keep it as stored
            name = name.encode("cp437").decode("gbk")
    return name


def drawable_name(relpath: str) -> str:
    """The Android resource name: the file name without ``.9.png``, ``.png``, ``.xml``... (lower case)."""
    name = relpath.rsplit("/", 1)[-1].lower()
    if is_ninepatch_name(name):
        return name[: -len(".9.png")]
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and f".{suffix}" in DRAWABLE_SUFFIXES else name


def drawable_density(relpath: str) -> int:
    """dpi of the ``drawable-*dpi`` folder holding the file; 160 (Android's default, mdpi) elsewhere."""
    for part in relpath.lower().split("/")[:-1]:
        match = _DENSITY_QUALIFIER.match(part)
        if match:
            return DENSITIES[match.group(1)]
    return 160


STATE_NAMES = ("normal", "off", "pressed/active", "disabled")


def drawable_state(relpath: str) -> int:
    """0 normal (``_normal``, ``_default`` or no state word), 1 ``_off``/``_unchecked``,
    2 pressed/down/highlight/selected/on/checked/locked, 3 disabled: lower is preferred."""
    words = set(re.split(r"[_\-.\s]+", drawable_name(relpath)))
    if words & DISABLED_STATE_WORDS:
        return 3
    if words & ACTIVE_STATE_WORDS:
        return 2
    return 1 if words & {"off", "unchecked"} else 0


def _inside(root: str, target: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


class SkinPackage:
    """An opened package: ``name``, ``path``, ``files`` (sorted relative POSIX paths). Use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = package_name(self.path)
        self._zip: zipfile.ZipFile | None = None
        self._zip_entries: dict[str, zipfile.ZipInfo] = {}
        if self.path.is_dir():
            self.files = self._folder_files()
        elif self.path.is_file() and self.path.suffix.lower() in ZIP_SUFFIXES:
            self._open_zip()
            self.files = sorted(self._zip_entries)
        elif not self.path.exists():
            raise SkingenError(f"{self.path}: skin package not found")
        else:
            raise SkingenError(f"{self.path}: a skin package must be a folder, a .zip or a .bds file")
        self._image_sizes: dict[str, tuple[int, int]] = {}

    def _folder_files(self) -> list[str]:
        """Every file under the folder; a symbolic link that leads outside the package is an error."""
        root = os.path.realpath(self.path)
        files = []
        try:
            for folder, dirs, names in os.walk(self.path):
                for name in [*dirs, *names]:
                    full = os.path.join(folder, name)
                    relpath = Path(full).relative_to(self.path).as_posix()
                    if os.path.islink(full) and not _inside(root, os.path.realpath(full)):
                        raise SkingenError(
                            f"{self.path}: '{relpath}' is a symbolic link to {os.path.realpath(full)}, outside the "
                            "package; copy the file into the package instead of linking to it"
                        )
                    if name in names and not _is_junk(relpath):
                        files.append(relpath)
        except OSError as err:
            raise SkingenError(f"{self.path}: cannot list the package ({err.strerror or err})") from None
        return sorted(files)

    def _open_zip(self) -> None:
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as err:
            raise SkingenError(f"{self.path}: not a readable zip file ({err}); re-create the package zip") from None
        links = {}
        for info in self._zip.infolist():
            name = _zip_entry_name(info)
            normalised = name.replace("\\", "/")
            if normalised.startswith("/") or _DRIVE.match(normalised) or ".." in PurePosixPath(normalised).parts:
                self.close()
                raise SkingenError(
                    f"{self.path}: unsafe zip entry {name!r} (absolute path or '..' leading outside the package); "
                    "a skin package may only hold relative paths: re-create the zip from the package folder"
                )
            if info.is_dir() or _is_junk(normalised):
                continue
            if info.file_size > MAX_ENTRY_BYTES:
                self.close()
                raise SkingenError(
                    f"{self.path}: zip entry {name!r} unpacks to {info.file_size} bytes (limit {MAX_ENTRY_BYTES}); "
                    "a skin element is never this large: remove it from the package"
                )
            if stat.S_ISLNK(info.external_attr >> 16):
                links[normalised] = info
                continue
            self._zip_entries[normalised] = info
        for normalised, info in links.items():
            target = self._zip.read(info).decode("utf-8", "replace")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(normalised), target))
            if target.startswith("/") or resolved.startswith("..") or resolved not in self._zip_entries:
                self.close()
                raise SkingenError(
                    f"{self.path}: zip entry '{normalised}' is a symbolic link to {target!r}, outside the package "
                    "(or to nothing in it); store the file itself in the zip instead of a link"
                )
            self._zip_entries[normalised] = self._zip_entries[resolved]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> SkinPackage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_bytes(self, relpath: str) -> bytes:
        if self._zip is None:
            try:
                return (self.path / relpath).read_bytes()
            except OSError as err:
                raise SkingenError(f"{self.path}: cannot read '{relpath}' ({err.strerror or err})") from None
        try:
            return self._zip.read(self._zip_entries[relpath])
        except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, KeyError) as err:
            raise SkingenError(f"{self.path}: cannot read zip entry '{relpath}' ({err}); re-create the package zip") from None

    def open_image(self, relpath: str) -> Image.Image:
        """The file decoded, fully loaded, as RGBA (:func:`skingen.skins.drawables.to_rgba`); an undecodable file raises
        SkingenError naming package and file."""
        try:
            with Image.open(io.BytesIO(self.read_bytes(relpath))) as image:
                image.load()
                return to_rgba(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise SkingenError(
                f"{self.path}: '{relpath}' is not a readable image ({err}); replace the file or remove it from the package"
            ) from None

    def image_size(self, relpath: str) -> tuple[int, int]:
        """Pixel size from the header (content size for a 9-patch); (0, 0) for XML drawables and unreadable files."""
        if relpath not in self._image_sizes:
            size = (0, 0)
            if not relpath.lower().endswith(".xml"):
                with contextlib.suppress(OSError, SyntaxError, ValueError, Image.DecompressionBombError, SkingenError):
                    with Image.open(io.BytesIO(self.read_bytes(relpath))) as image:
                        size = image.size
                        if is_ninepatch_name(relpath):
                            size = (max(0, size[0] - 2), max(0, size[1] - 2))
            self._image_sizes[relpath] = size
        return self._image_sizes[relpath]

    def load_element(self, relpath: str, depth: int = 0) -> Image.Image | NinePatch | ShapeDrawable:
        """An element as RGBA, a parsed 9-patch for ``*.9.png`` files, or an XML ``<shape>`` (a ``<selector>``'s
        normal item, followed to the file it names)."""
        if relpath.lower().endswith(".xml"):
            drawable = parse_xml_drawable(self.read_bytes(relpath), f"{self.path}: '{relpath}'", drawable_density(relpath))
            if isinstance(drawable, DrawableRef):
                return self.load_element(self._resolve_reference(drawable, relpath, depth), depth + 1)
            return drawable
        image = self.open_image(relpath)
        if is_ninepatch_name(relpath):
            return parse_ninepatch(image, source=f"{self.path}: '{relpath}'")
        return image

    def _resolve_reference(self, ref: DrawableRef, relpath: str, depth: int) -> str:
        matches = [f for f in self.files if f.lower().endswith(DRAWABLE_SUFFIXES) and drawable_name(f) == ref.name.lower()]
        if depth >= _MAX_REFERENCE_DEPTH or not matches:
            why = "references nest too deep" if matches else "no file of that name in the package"
            raise SkingenError(f"{ref.source}: @drawable/{ref.name} cannot be followed ({why}); add the file or name a PNG")
        return rank_candidates(self, [(0, f) for f in matches if f != relpath] or [(0, matches[0])]).source

    def manifest(self, layout: Layout) -> Manifest | None:
        """The package's ``skin.yaml`` (at its root, or in its single top folder), or None."""
        found = sorted((f for f in self.files if PurePosixPath(f).name == MANIFEST_NAME), key=lambda f: f.count("/"))
        if not found or found[0].count("/") > 1:
            return None
        base = str(PurePosixPath(found[0]).parent).strip(".")
        return parse_manifest(self.read_bytes(found[0]), f"{self.path}: {found[0]}", base, set(self.files), layout)


def package_name(path: str | os.PathLike) -> str:
    path = Path(path)
    return path.stem if path.suffix.lower() in ZIP_SUFFIXES else path.name


def open_package(path: str | os.PathLike) -> SkinPackage:
    return SkinPackage(path)


def list_packages(packages_dir: str | os.PathLike) -> list[Path]:
    """Every sub-folder and .zip of ``packages_dir`` (hidden ones skipped), sorted; package names must be unique."""
    packages_dir = Path(packages_dir)
    if not packages_dir.is_dir():
        raise SkingenError(f"--packages_dir {packages_dir}: not a folder")
    found = sorted(
        p
        for p in packages_dir.iterdir()
        if not p.name.startswith(".") and (p.is_dir() or (p.is_file() and p.suffix.lower() in ZIP_SUFFIXES))
    )
    if not found:
        raise SkingenError(
            f"--packages_dir {packages_dir}: no skin packages inside (expected sub-folders or .zip files, one per skin)"
        )
    check_unique_names(found)
    return found


def check_unique_names(paths: list[Path]) -> None:
    by_name: dict[str, Path] = {}
    for path in paths:
        other = by_name.setdefault(package_name(path), path)
        if other != path:
            raise SkingenError(
                f"packages {other} and {path} both have the name '{package_name(path)}' and would write the same "
                "image; rename or remove one"
            )


@dataclass(frozen=True)
class Choice:
    """The file chosen for one layer, and why: the other candidates and whether it was a tie."""

    role: str
    source: str
    reason: str
    others: tuple[str, ...] = ()
    tie: bool = False


@dataclass
class ElementLayers:
    background: Choice | None = None
    icon: Choice | None = None
    label: Label | None = None
    from_manifest: bool = False

    @property
    def main(self) -> Choice | None:
        return self.background or self.icon


@dataclass
class ElementMatches:
    """Which package files each layout element comes from, what is missing and what is left over."""

    layers: dict[str, ElementLayers] = field(default_factory=dict)  # element id -> its layers
    missing: list = field(default_factory=list)  # required elements with no matching file
    extras: list[str] = field(default_factory=list)  # package files no element uses
    manifest: Manifest | None = None
    tried: dict[str, tuple[str, ...]] = field(default_factory=dict)  # element id -> patterns tried (for messages)

    @property
    def found(self) -> dict[str, str]:
        """Element id -> the file of its main layer (the background, else the icon)."""
        return {k: v.main.source for k, v in self.layers.items() if v.main is not None}

    def missing_message(self, package: SkinPackage, layout: Layout) -> str:
        details = "; ".join(f"{e.id} (tried {', '.join(self.tried.get(e.id, e.patterns))})" for e in self.missing)
        return (
            f"{package.path}: missing required element(s) for layout '{layout.name}': {details}. "
            f"Add the files to the package, extend the patterns in {layout.path} or the element map, "
            "name them in the package's skin.yaml, or pass --skip_incomplete"
        )

    def choice_lines(self) -> list[str]:
        """One line per layer choice (for --verbose)."""
        lines = []
        for element_id, layers in self.layers.items():
            for choice in (layers.background, layers.icon):
                if choice is not None:
                    tie = " (TIE: first path taken)" if choice.tie else ""
                    others = f"; over {', '.join(choice.others[:4])}{' ...' if len(choice.others) > 4 else ''}" if choice.others else ""
                    lines.append(f"  {element_id}.{choice.role}: {choice.source} [{choice.reason}]{tie}{others}")
            if layers.label is not None:
                lines.append(f"  {element_id}.label: {layers.label.text!r}")
        return lines


@dataclass(frozen=True)
class _Candidate:
    """A package file in the three forms patterns are matched against (all lower case)."""

    relpath: str
    path: str
    name: str
    drawable: str

    @classmethod
    def of(cls, relpath: str) -> _Candidate:
        lower = relpath.lower()
        return cls(relpath, lower, lower.rsplit("/", 1)[-1], drawable_name(relpath))


def _matches(candidate: _Candidate, pattern: str) -> bool:
    pattern = pattern.lower()
    if "/" in pattern:
        return fnmatch.fnmatchcase(candidate.path, pattern)
    if "." not in pattern:  # a drawable name: any of its file forms
        return fnmatch.fnmatchcase(candidate.drawable, pattern)
    return fnmatch.fnmatchcase(candidate.name, pattern)


def rank_candidates(package: SkinPackage, candidates: list[tuple[int, str]], role: str = "background") -> Choice:
    """The best of ``(pattern_index, file)`` candidates by the rules in the module doc."""

    def key(item):
        index, relpath = item
        return index, relpath.lower().endswith(".xml"), drawable_state(relpath), -drawable_density(relpath)

    ordered = sorted(candidates, key=lambda item: (key(item), item[1]))
    best_key = key(ordered[0])
    front = [item for item in ordered if key(item) == best_key]
    tie = False
    if len(front) > 1:
        areas = {f: package.image_size(f)[0] * package.image_size(f)[1] for _, f in front}
        front.sort(key=lambda item: -areas[item[1]])
        tie = areas[front[0][1]] == areas[front[1][1]]
    source = front[0][1]
    state = STATE_NAMES[drawable_state(source)]
    reason = f"pattern #{best_key[0] + 1}, {state}, {drawable_density(source)} dpi"
    if len(front) > 1:
        reason += f", largest ({'x'.join(map(str, package.image_size(source)))})"
    others = tuple(f for _, f in ordered if f != source)
    return Choice(role=role, source=source, reason=reason, others=others, tie=tie)


def _choose(package: SkinPackage, patterns: tuple[str, ...], role: str, files: list[_Candidate]) -> Choice | None:
    candidates = [(i, f.relpath) for i, pattern in enumerate(patterns) for f in files if _matches(f, pattern)]
    seen, unique = set(), []
    for index, relpath in candidates:  # a file matched by several patterns counts at its earliest one
        if relpath not in seen:
            seen.add(relpath)
            unique.append((index, relpath))
    return rank_candidates(package, unique, role) if unique else None


def _rule_for(element: Element, element_map: ElementMap | None) -> ElementRule:
    rule = element_map.rules.get(element.id) if element_map is not None else None
    if rule is None:
        return ElementRule(background=element.patterns)
    return ElementRule(background=rule.background or (() if rule.icon else element.patterns), icon=rule.icon, label=rule.label)


def find_elements(package: SkinPackage, layout: Layout, element_map: ElementMap | None = None) -> ElementMatches:
    """Each layout element's layers: from the package's manifest, else the element map, else the layout's patterns."""
    result = ElementMatches(manifest=package.manifest(layout))
    files = [_Candidate.of(f) for f in package.files if f.lower().endswith(DRAWABLE_SUFFIXES)]
    for element in layout.elements:
        manifest = result.manifest
        if manifest is not None and element.id in manifest.missing:
            continue
        if manifest is not None and element.id in manifest.files:
            rule = manifest.files[element.id]
            layers = ElementLayers(
                background=Choice("background", rule.background[0], "skin.yaml") if rule.background else None,
                icon=Choice("icon", rule.icon[0], "skin.yaml") if rule.icon else None,
                label=rule.label,
                from_manifest=True,
            )
        else:
            rule = _rule_for(element, element_map)
            layers = ElementLayers(
                background=_choose(package, rule.background, "background", files) if rule.background else None,
                icon=_choose(package, rule.icon, "icon", files) if rule.icon else None,
                label=rule.label,
            )
        if layers.main is not None:
            result.layers[element.id] = layers
        elif element.required:
            result.missing.append(element)
            result.tried[element.id] = (*rule.background, *rule.icon)
    used = {c.source for v in result.layers.values() for c in (v.background, v.icon) if c is not None}
    manifest_file = {f for f in package.files if PurePosixPath(f).name == MANIFEST_NAME}
    result.extras = [f for f in package.files if f not in used and f not in manifest_file]
    return result
