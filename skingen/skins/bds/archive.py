"""Zipping a package the way the app imports it: one flat zip, entries relative to the skin folder
(``Info.txt``, ``demo.png``, then ``port/``, ``land/``, ``res/``), deflate-compressed, no folder entries, fixed
timestamps (the same files give the same bytes)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from PIL import Image

from ...fileio import atomic_write_bytes

_FIRST = ("Info.txt", "demo.png")
_STAMP = (2024, 1, 1, 0, 0, 0)


def _order(name: str) -> tuple:
    top = name.split("/", 1)[0]
    rank = _FIRST.index(name) if name in _FIRST else len(_FIRST) + (("port", "land", "res").index(top) if top in ("port", "land", "res") else 3)
    return rank, name


def bds_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files, key=_order):
            info = zipfile.ZipInfo(name, date_time=_STAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name])
    return buffer.getvalue()


def write_bds(path: str | Path, files: dict[str, bytes]) -> Path:
    """``files`` (package-relative POSIX paths -> bytes) zipped into ``path``, written atomically."""
    return atomic_write_bytes(path, bds_bytes(files))


def info_txt(fields: dict[str, str]) -> bytes:
    """``Info.txt``: ``key=value`` lines, UTF-8 with a BOM, CRLF line ends."""
    return "\r\n".join([*(f"{key}={value}" for key, value in fields.items()), ""]).encode("utf-8-sig")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
