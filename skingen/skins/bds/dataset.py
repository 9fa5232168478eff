"""One dataset row per Baidu package: its own keyboard drawn (``merge_elements.py --layout package``), with
exact boxes and strings (``box``, ``texts``; ``texts_exact: true`` tells later stages not to OCR them), what each
box is (``items``), the faithfulness to the package's demo.png, and where the package came from (``--split
--format bds`` writes the image back into that package's structure)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ...errors import SkingenError
from ...prep.ocr import TextLine
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


def exact_text_lines(row_raw: dict) -> list:
    """The row's own labelled boxes as text lines (score 1), for rows whose ``texts_exact`` says no OCR is needed."""
    return [TextLine(quad, text, 1.0) for quad, text in zip(row_raw.get("box", []), row_raw.get("texts", [])) if text.strip()]


def boxes_template(size: tuple[int, int], quads: list, line_width: int = 2) -> Image.Image:
    """A row's own layout template: white outlines of its boxes on black (its keyboard's keys)."""
    template = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(template)
    for quad in quads:
        xs, ys = [p[0] for p in quad], [p[1] for p in quad]
        draw.rectangle((round(min(xs)), round(min(ys)), round(max(xs)) - 1, round(max(ys)) - 1), outline=(255, 255, 255), width=line_width)
    return template
