"""One dataset row per Baidu package: its own keyboard drawn (``merge_elements.py --layout package``), with
exact boxes and strings (``box``, ``texts``; ``texts_exact: true`` tells later stages not to OCR them), what each
box is (``items``), the faithfulness to the package's demo.png, and where the package came from (``--split
--format bds`` writes the image back into that package's structure)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import SkingenError
from .package import BdsPackage, is_bds_package
from .render import demo_edge_f1, render_keyboard

PACKAGE_LAYOUT = "package"  # the --layout value that draws each package's own keyboard


@dataclass
class PackageRow:
    image: Image.Image
    row: dict
    warnings: list[str]
    demo_f1: float | None


def render_package_row(path: str | os.PathLike, name: str, keyboard: str, orientation: str, width: int | None) -> PackageRow:
    """The package's ``keyboard`` drawn at ``width`` and its row (without the image path, which the caller sets)."""
    if not is_bds_package(path):
        raise SkingenError(
            f"{path}: --layout {PACKAGE_LAYOUT} draws a Baidu skin's own keyboards, and this is not a Baidu skin "
            "package (.bds, or a folder/zip with port/ or land/ layouts and res/default.css); use an atlas layout"
        )
    with BdsPackage(path) as package:
        board = package.keyboard(keyboard, orientation)
        rendered = render_keyboard(package, board, width)
        package.info()
        f1 = demo_edge_f1(rendered.image, package.demo()) if (orientation, keyboard) == ("port", "py_26") else None
        row = {
            "package": name, "layout": PACKAGE_LAYOUT, "keyboard": keyboard, "orientation": orientation,
            "source_package": str(Path(path).resolve()), "design_size": list(rendered.design_size),
            "box": rendered.boxes, "texts": rendered.texts, "texts_exact": True, "items": rendered.items,
        }  # fmt: skip
        return PackageRow(rendered.image, row, list(package.warnings), f1)
