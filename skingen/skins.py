"""Skin packages: a folder or a .zip of element images, and finding a layout's elements in one.

Elements are found by file name (case-insensitive globs, tried in the element's pattern order;
among files matching the same pattern, the first path in sorted order wins), anywhere in the
package's sub-folders. Zip packages are read in memory, never extracted; an entry whose path is
absolute or climbs out with ``..`` (zip-slip) makes the whole package an error.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from PIL import Image

from .errors import SkingenError
from .ninepatch import NinePatch, is_ninepatch_name, parse_ninepatch

if TYPE_CHECKING:
    from .layout import Layout

MAX_ENTRY_BYTES = 256 * 1024 * 1024  # no skin element comes near this; larger entries are zip bombs or mistakes
_JUNK_PARTS = ("__MACOSX",)
_DRIVE = re.compile(r"^[A-Za-z]:")


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


class SkinPackage:
    """An opened package: ``name``, ``path``, ``files`` (sorted relative POSIX paths). Use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = package_name(self.path)
        self._zip: zipfile.ZipFile | None = None
        self._zip_entries: dict[str, zipfile.ZipInfo] = {}
        if self.path.is_dir():
            self.files = sorted(
                p.relative_to(self.path).as_posix()
                for p in self.path.rglob("*")
                if p.is_file() and not _is_junk(p.relative_to(self.path).as_posix())
            )
        elif self.path.is_file() and self.path.suffix.lower() == ".zip":
            self._open_zip()
            self.files = sorted(self._zip_entries)
        elif not self.path.exists():
            raise SkingenError(f"{self.path}: skin package not found")
        else:
            raise SkingenError(f"{self.path}: a skin package must be a folder or a .zip file")

    def _open_zip(self) -> None:
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as err:
            raise SkingenError(f"{self.path}: not a readable zip file ({err}); re-create the package zip") from None
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
            self._zip_entries[normalised] = info

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
            return (self.path / relpath).read_bytes()
        try:
            return self._zip.read(self._zip_entries[relpath])
        except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, KeyError) as err:
            raise SkingenError(f"{self.path}: cannot read zip entry '{relpath}' ({err}); re-create the package zip") from None

    def open_image(self, relpath: str) -> Image.Image:
        """The file decoded and fully loaded; an undecodable file raises SkingenError naming package and file."""
        try:
            image = Image.open(io.BytesIO(self.read_bytes(relpath)))
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise SkingenError(
                f"{self.path}: '{relpath}' is not a readable image ({err}); replace the file or remove it from the package"
            ) from None
        return image

    def load_element(self, relpath: str) -> Image.Image | NinePatch:
        """An element as RGBA, or a parsed 9-patch for ``*.9.png`` files."""
        image = self.open_image(relpath).convert("RGBA")
        if is_ninepatch_name(relpath):
            return parse_ninepatch(image, source=f"{self.path}: '{relpath}'")
        return image


def package_name(path: str | os.PathLike) -> str:
    path = Path(path)
    return path.stem if path.suffix.lower() == ".zip" else path.name


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
        if not p.name.startswith(".") and (p.is_dir() or (p.is_file() and p.suffix.lower() == ".zip"))
    )
    if not found:
        raise SkingenError(f"--packages_dir {packages_dir}: no skin packages (sub-folders or .zip files) inside")
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


@dataclass
class ElementMatches:
    """Which package file each layout element comes from, what is missing and what is left over."""

    found: dict[str, str] = field(default_factory=dict)  # element id -> package file
    missing: list = field(default_factory=list)  # required elements with no matching file
    extras: list[str] = field(default_factory=list)  # package files no element uses

    def missing_message(self, package: SkinPackage, layout: Layout) -> str:
        details = "; ".join(f"{e.id} (tried {', '.join(e.patterns)})" for e in self.missing)
        return (
            f"{package.path}: missing required element(s) for layout '{layout.name}': {details}. "
            f"Add the files to the package, extend the patterns in {layout.path}, or pass --skip_incomplete"
        )


def _matches(relpath: str, pattern: str) -> bool:
    target = relpath if "/" in pattern else PurePosixPath(relpath).name
    return fnmatch.fnmatchcase(target.lower(), pattern.lower())


def find_elements(package: SkinPackage, layout: Layout) -> ElementMatches:
    """Match each layout element to the first package file its patterns find (pattern order, then path order)."""
    result = ElementMatches()
    for element in layout.elements:
        source = next((f for pattern in element.patterns for f in package.files if _matches(f, pattern)), None)
        if source is not None:
            result.found[element.id] = source
        elif element.required:
            result.missing.append(element)
    used = set(result.found.values())
    result.extras = [f for f in package.files if f not in used]
    return result
