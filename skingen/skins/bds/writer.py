"""An image of a package's keyboard written back as a ``.bds`` the Baidu IME imports (``merge_elements.py --split
--format bds``).

The new package has its source package's structure (every file of it, or of the stock template
``configs/bds/stock.bds`` when the source is unknown) with the drawn keyboard replaced: its design size becomes
the image's pixels, and the panel background, the candidate bar and its icons, the list panel and every key get
a sprite cut from the image at their places (sheet ``res/skingen_<keyboard>_<orientation>.png`` for the normal
state and ``..._hl.png``, darkened, for the pressed one, each with its ``.til``; new ``[STYLEn]`` appended to
``default.css``). Foregrounds, text styles and list cell styles of that keyboard are dropped (they are in the
sprites now); key values (``CENTER``, ``SHOW``, swipes, ``HOLD``, ``STAT_STYLE``...) are kept, so every key still
types what it did. Drawing the written package at the image's width gives the image back exactly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ...data.dataset import read_rows
from ...data.images import open_rgb
from ...errors import SkingenError
from ..layout import Layout, load_layout
from .archive import info_txt, png_bytes, write_bds
from .atlas_writer import write_atlas_bds
from .ini import IniFile, format_ini
from .package import BdsPackage, Keyboard
from .resources import pack_sheet, pressed, til_sections

STOCK_PACKAGE = Path(__file__).resolve().parents[3] / "configs" / "bds" / "stock.bds"
STOCK_KEYBOARD = ("py_26", "port")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class _Mapping:
    """Old design pixels -> the image's pixels (:meth:`canvas`) and the new design pixels (:meth:`rect`, whose
    (0, 0) is the panel's top-left again: ``zero`` is where it lands on the image)."""

    origin: tuple[int, int]
    scale: tuple[float, float]
    zero: tuple[int, int]

    @classmethod
    def of(cls, board: Keyboard, size: tuple[int, int]) -> _Mapping:
        x0, y0, x1, y1 = board.canvas
        scale = (size[0] / (x1 - x0), size[1] / (y1 - y0))
        return cls((x0, y0), scale, (round(-x0 * scale[0]), round(-y0 * scale[1])))

    def canvas(self, x: float, y: float) -> tuple[int, int]:
        return round((x - self.origin[0]) * self.scale[0]), round((y - self.origin[1]) * self.scale[1])

    def rect(self, rect) -> tuple[int, int, int, int]:
        """A rect in new design pixels (at least 1x1)."""
        x, y, w, h = rect
        (left, top), (right, bottom) = self.canvas(x, y), self.canvas(x + w, y + h)
        return left - self.zero[0], top - self.zero[1], max(1, right - left), max(1, bottom - top)


def _values(section) -> dict[str, str]:
    return {key: value for key, (value, _) in section.values.items()} if section is not None else {}


def _rect_text(rect) -> str:
    return ",".join(str(v) for v in rect)


class _Sprites:
    """Crops of the image (new design rects), numbered as a sheet's sprites, and the styles naming them."""

    def __init__(self, image: Image.Image, zero: tuple[int, int], sheet: str, first_style: int):
        self.image, self.zero, self.sheet = image.convert("RGBA"), zero, sheet
        self.crops: list[Image.Image] = []
        self.styles: list[tuple[str, dict]] = []
        self.next_style = first_style

    def style_for(self, rect) -> str:
        x, y, w, h = rect
        left, top = x + self.zero[0], y + self.zero[1]
        self.crops.append(self.image.crop((left, top, left + w, top + h)))
        style_id = str(self.next_style)
        self.next_style += 1
        index = len(self.crops)
        self.styles.append((f"STYLE{style_id}", {"NM_IMG": f"{self.sheet},{index}", "HL_IMG": f"{self.sheet}_hl,{index}"}))
        return style_id

    def files(self) -> dict[str, bytes]:
        sheet, rects = pack_sheet(self.crops, max(64, self.image.width))
        til = format_ini(til_sections(rects, [None] * len(rects), use_alpha=0))
        out = {}
        for name, picture in ((self.sheet, sheet), (f"{self.sheet}_hl", pressed(sheet))):
            out[f"res/{name}.png"], out[f"res/{name}.til"] = png_bytes(picture), til
        return out


def _keyboard_sections(layout: IniFile, board: Keyboard, mapping: _Mapping, sprites: _Sprites, cnd_name: str) -> list:
    panel = _values(layout.get("PANEL"))
    panel.update(SIZE=_rect_text(mapping.rect((0, 0, *board.size))[2:]), BACK_STYLE=sprites.style_for(mapping.rect((0, 0, *board.size))))
    sections = [("PANEL", panel)]
    keys = {key.section: key for key in board.keys}
    for name, section in layout.sections.items():
        values = _values(section)
        if name == "PANEL":
            continue
        if name in keys:
            rect = mapping.rect(keys[name].rect)
            for dropped in ("FORE_STYLE", "POS_TYPE"):
                values.pop(dropped, None)
            if "TOUCH_RECT" in values and section.rect("TOUCH_RECT"):
                values["TOUCH_RECT"] = _rect_text(mapping.rect(section.rect("TOUCH_RECT")))
            values.update(VIEW_RECT=_rect_text(rect), BACK_STYLE=sprites.style_for(rect))
        elif name == "LIST" and board.list_panel is not None:
            cell = mapping.rect(board.list_panel.cells[0])
            values.update(POS=f"{cell[0]},{cell[1]}", CELL_SIZE=f"{cell[2]},{cell[3]}")
            count, horizontal = len(board.list_panel.cells), section.int("LIST_ORDER", 0) == 1
            whole = (cell[0], cell[1], cell[2] * (count if horizontal else 1), cell[3] * (1 if horizontal else count))
            values["BACK_STYLE"] = sprites.style_for(whole)
            for dropped in ("CELL_STYLE", "FORE_STYLE"):
                values.pop(dropped, None)
        elif name == "CAND":
            continue  # rewritten below
        sections.append((name, values))
    if board.candidate_bar is not None:
        sections.append(("CAND", {"VIEW_RECT": _rect_text(mapping.rect(board.candidate_bar.rect)), "LAYOUT_NAME": cnd_name}))
    return sections


def _candidate_sections(package: BdsPackage, board: Keyboard, mapping: _Mapping, sprites: _Sprites) -> list:
    bar = board.candidate_bar
    bar_rect = mapping.rect(bar.rect)
    source = package.ini(bar.file) if bar.file else None
    head = _values(source.get("CAND") or source.get("TAB")) if source else {}
    head["BACK_STYLE"] = sprites.style_for(bar_rect)
    sections = [("CAND", head)]
    drawn = {icon.section: icon for icon in bar.icons}
    for _, section in (source.numbered("ICON") if source else []):
        values = _values(section)
        if section.name in drawn:
            x, y, w, h = mapping.rect(drawn[section.name].rect)
            values.update(SIZE=f"{w},{h}", POS=f"{x - bar_rect[0]},{y - bar_rect[1]}", ANCHOR_TYPE="1",
                          BACK_STYLE=sprites.style_for((x, y, w, h)))  # fmt: skip
            values.pop("FORE_STYLE", None)
        sections.append((section.name, values))
    return sections


def write_keyboard_bds(image: Image.Image, source: str | Path, keyboard: str, orientation: str, out_path: Path, name: str) -> Path:
    """``image`` (the keyboard as drawn, any size of its aspect) written as a .bds built on ``source``."""
    with BdsPackage(source) as package:
        board = package.keyboard(keyboard, orientation)
        mapping = _Mapping.of(board, image.size)
        styles = package.styles()
        numeric = [int(s) for s in styles if s.isdigit()]
        sheet = f"skingen_{keyboard}_{orientation}"
        sprites = _Sprites(image, mapping.zero, sheet, max([90000, *(n + 1 for n in numeric)]))
        files = {relpath: package.read(relpath) for relpath in sorted(package.files)}
        cnd_name = f"skingen_{keyboard}"
        layout_sections = _keyboard_sections(package.ini(board.file), board, mapping, sprites, cnd_name)
        if board.candidate_bar is not None:
            files[f"{orientation}/{cnd_name}.cnd"] = format_ini(_candidate_sections(package, board, mapping, sprites))
        files[board.file] = format_ini(layout_sections)
        css = package.ini("res/default.css")
        css_sections = [(n, _values(s)) for n, s in css.sections.items() if n != "GLOBAL"]
        css_global = _values(css.get("GLOBAL"))
        if "STYLE_NUM" in css_global:
            css_global["STYLE_NUM"] = str(len(css_sections) + len(sprites.styles))
        files["res/default.css"] = format_ini([("GLOBAL", css_global), *css_sections, *sprites.styles])
        files.update(sprites.files())
        info = package.info()
        info["Name"] = name
        files["Info.txt"] = info_txt(info)
        files["demo.png"] = png_bytes(image.convert("RGB"))
    return write_bds(out_path, files)


def _atlas_job(path: Path, row: dict, args: argparse.Namespace) -> tuple[Layout, Image.Image | None]:
    """The layout an atlas row was merged with (boxes checked) and its saved alpha."""
    with Image.open(path) as image:
        width = image.width
    layout = load_layout(args.layout, args.resolution if args.resolution is not None else width)
    boxes = {e.id: list(e.box) for e in layout.elements}
    if any(boxes.get(r.get("id")) != r.get("box") for r in row["elements"]):
        raise SkingenError(
            f"{path}: the row of '{path.stem}' in {args.dataset_dir} was merged with other boxes than layout "
            f"'{layout.name}' at {layout.width}x{layout.height}; pass the --layout and --resolution it was merged with"
        )
    mask = Path(args.dataset_dir) / "masks" / f"{path.stem}.png"
    alpha = Image.open(mask).convert("L") if mask.is_file() else None
    return layout, alpha


def split_to_bds(args: argparse.Namespace) -> None:
    """``--split --format bds``: each --input image as ``<output_dir>/<name>.bds`` on its source package (the
    dataset row of the same package name gives it; a keyboard image or an atlas) or the stock template."""
    source = Path(args.input)
    if not source.exists():
        raise SkingenError(f"--input {source}: no such file or folder")
    inputs = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if source.is_dir() else [source]
    if not inputs:
        raise SkingenError(f"--input {source}: no images ({', '.join(IMAGE_SUFFIXES)}) inside")
    rows = {row.get("package"): row for row in read_rows(Path(args.dataset_dir))} if args.dataset_dir else {}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in tqdm(inputs, desc="write .bds", unit="skin"):
        target = output_dir / f"{path.stem}.bds"
        if target.is_file():
            continue  # written atomically by an earlier run: complete
        row = rows.get(path.stem) or {}
        known = Path(str(row.get("source_package"))).exists() if row.get("source_package") else False
        if known and row.get("layout") == "package":
            write_keyboard_bds(open_rgb(path, str(path)), row["source_package"], row["keyboard"], row["orientation"], target, path.stem)
        elif known and isinstance(row.get("elements"), list):
            layout, alpha = _atlas_job(path, row, args)
            _, kept = write_atlas_bds(open_rgb(path, str(path)), layout, row["elements"], alpha, row["source_package"], target, path.stem)
            if kept:
                tqdm.write(f"{path.name}: elements drawn from several layers, not written back (their styles keep the source sprites unless another element gave them new ones): {', '.join(kept)}")
        else:
            if args.dataset_dir:
                tqdm.write(f"warning: {path.name}: no row of '{path.stem}' with its source package in "
                           f"{args.dataset_dir}; written on the stock template {STOCK_PACKAGE.name}")
            write_keyboard_bds(open_rgb(path, str(path)), STOCK_PACKAGE, *STOCK_KEYBOARD, target, path.stem)
        written += 1
    print(f"wrote {written} .bds packages into {output_dir} ({len(inputs) - written} already there)")
