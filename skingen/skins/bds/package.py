"""A Baidu skin package, zipped (``.bds``, or ``.zip``) or unzipped, and the keyboards it describes.

The package's skin folder (its root, or the shallowest folder holding ``res/default.css`` or ``port/``/``land/``
layouts, ``light/`` before ``dark/``) holds ``Info.txt``, ``demo.png``, ``port/`` and ``land/`` (one ``.ini`` per
keyboard, ``gen.ini`` with defaults and the ``[OFFSETn]`` table, ``*.cnd`` candidate bars) and ``res/``. A file
is looked up in the orientation folder first, then at the skin root. Reading goes through
:class:`skingen.skins.package.SkinPackage` (zip-slip and outside links refused). Broken parts are a ``SkingenError``
naming ``file:line``; missing optional parts (``Info.txt``, ``demo.png``, a candidate-bar file, a style a key
names) are warnings collected in :attr:`BdsPackage.warnings`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from ...errors import SkingenError
from ..package import SkinPackage
from .ini import IniFile, Section, decode_text, parse_ini
from .resources import Sprite, Style, cut_sprites, decode_sheet, parse_styles, parse_tiles

ORIENTATIONS = ("port", "land")
CSS_PATH = "res/default.css"
GENERAL_LAYOUT = "gen"  # gen.ini: defaults every keyboard shares
KEY_VALUES = ("CENTER", "UP", "DOWN", "LEFT", "RIGHT", "SHOW", "HOLD")
BDS_SUFFIX = ".bds"


@dataclass(frozen=True)
class Key:
    section: str
    where: str
    rect: tuple[int, int, int, int]  # x, y, w, h in the panel's design pixels
    back: str | None
    fores: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]  # per fore style: the shift from the key's centre
    values: dict[str, str]


@dataclass(frozen=True)
class ListPanel:
    where: str
    cells: tuple[tuple[int, int, int, int], ...]
    back: str | None
    cell: str | None
    fore: str | None
    names: tuple[str, ...]
    values: tuple[str, ...]

    @property
    def rect(self) -> tuple[int, int, int, int]:
        x0 = min(c[0] for c in self.cells)
        y0 = min(c[1] for c in self.cells)
        x1 = max(c[0] + c[2] for c in self.cells)
        y1 = max(c[1] + c[3] for c in self.cells)
        return x0, y0, x1 - x0, y1 - y0


@dataclass(frozen=True)
class Icon:
    section: str
    where: str
    rect: tuple[int, int, int, int]
    back: str | None
    fore: str | None
    key: str


@dataclass(frozen=True)
class CandidateBar:
    where: str
    file: str | None
    rect: tuple[int, int, int, int]
    back: str | None
    icons: tuple[Icon, ...]


@dataclass(frozen=True)
class Keyboard:
    name: str
    orientation: str
    file: str
    size: tuple[int, int]
    back: str | None
    keys: tuple[Key, ...]
    list_panel: ListPanel | None
    candidate_bar: CandidateBar | None

    @property
    def canvas(self) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1 of everything drawn: the panel and whatever lies outside it (a bar above it)."""
        rects = [(0, 0, *self.size)] + [k.rect for k in self.keys]
        rects += [self.list_panel.rect] if self.list_panel else []
        rects += [self.candidate_bar.rect] if self.candidate_bar else []
        return (min(r[0] for r in rects), min(r[1] for r in rects),
                max(r[0] + r[2] for r in rects), max(r[1] + r[3] for r in rects))  # fmt: skip


def _skin_root(files: list[str]) -> str | None:
    """The folder (``""`` or ``a/b/``) that holds res/default.css or the port/land layouts."""
    roots = set()
    for relpath in files:
        parts = PurePosixPath(relpath).parts
        for i, part in enumerate(parts[:-1]):
            if (part in ORIENTATIONS and relpath.lower().endswith((".ini", ".cnd"))) or "/".join(parts[i:]) == CSS_PATH:
                roots.add("".join(f"{p}/" for p in parts[:i]))
    if not roots:
        return None
    return min(roots, key=lambda r: (r.count("/"), "light" not in r, r))


def is_bds_package(path: str | os.PathLike) -> bool:
    """A ``.bds`` file, or a folder / zip whose files have a Baidu skin's shape."""
    path = Path(path)
    if path.suffix.lower() == BDS_SUFFIX:
        return True
    if path.is_dir():
        found = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()][:5000]
        return _skin_root(found) is not None
    if path.suffix.lower() == ".zip":
        with SkinPackage(path) as package:
            return _skin_root(package.files) is not None
    return False


class BdsPackage:
    """An opened Baidu skin package; use as a context manager. ``warnings`` collects missing optional parts."""

    def __init__(self, path: str | os.PathLike):
        self.package = SkinPackage(path)
        self.path, self.name = self.package.path, self.package.name
        root = _skin_root(self.package.files)
        if root is None:
            self.package.close()
            raise SkingenError(
                f"{self.path}: not a Baidu skin package: no port/ or land/ keyboard layouts (*.ini) and no "
                f"{CSS_PATH}; a .bds holds Info.txt, port/, land/ and res/"
            )
        self.root = root
        self.files = {f[len(root) :] for f in self.package.files if f.startswith(root)}
        self.warnings: list[str] = []
        self._ini: dict[str, IniFile] = {}
        self._sheets: dict[str, list[Sprite]] = {}
        self._styles: dict[str, Style] | None = None
        self._warned: set[str] = set()

    def close(self) -> None:
        self.package.close()

    def __enter__(self) -> BdsPackage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def where(self, relpath: str) -> str:
        return f"{self.path}/{self.root}{relpath}"

    def warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.warnings.append(message)

    def read(self, relpath: str) -> bytes:
        return self.package.read_bytes(self.root + relpath)

    def ini(self, relpath: str) -> IniFile:
        if relpath not in self._ini:
            self._ini[relpath] = parse_ini(self.read(relpath), self.where(relpath))
        return self._ini[relpath]

    def find(self, name: str, orientation: str) -> str | None:
        """``name`` in the orientation folder, else at the skin root (case-insensitive), else None."""
        by_lower = {f.lower(): f for f in self.files}
        for candidate in (f"{orientation}/{name}", name):
            if candidate.lower() in by_lower:
                return by_lower[candidate.lower()]
        return None

    # --- package-level parts -------------------------------------------------------------------------------

    def info(self) -> dict[str, str]:
        """Info.txt's ``key=value`` lines (name, author, platform...); {} with a warning when it is missing."""
        relpath = self.find("Info.txt", "")
        if relpath is None:
            self.warn(f"{self.where('Info.txt')}: missing (name, author); the package is read without it")
            return {}
        fields = {}
        for line in decode_text(self.read(relpath), self.where(relpath)).splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip():
                fields[key.strip()] = value.strip()
        return fields

    def demo(self) -> Image.Image | None:
        relpath = self.find("demo.png", "")
        if relpath is None:
            self.warn(f"{self.where('demo.png')}: missing (the skin's preview); no faithfulness figure for it")
            return None
        return decode_sheet(self.read(relpath), self.where(relpath))

    def styles(self) -> dict[str, Style]:
        if self._styles is None:
            if CSS_PATH not in self.files:
                raise SkingenError(f"{self.where(CSS_PATH)}: missing; every key's look is defined there, add it")
            self._styles = parse_styles(self.ini(CSS_PATH))
        return self._styles

    def style(self, style_id: str | None, where: str) -> Style | None:
        """The style a layout names (None for none or ``0``); an unknown id is a warning and draws nothing."""
        if not style_id or style_id == "0":
            return None
        style = self.styles().get(style_id)
        if style is None:
            self.warn(f"{where}: style {style_id} is not in {CSS_PATH}; drawn without it")
        return style

    def sprite(self, ref: tuple[str, int], where: str) -> Sprite:
        sheet, index = ref
        if sheet not in self._sheets:
            png, til = f"res/{sheet}.png", f"res/{sheet}.til"
            for relpath in (png, til):
                if relpath not in self.files:
                    raise SkingenError(f"{where}: names sprite sheet '{sheet}' but {self.where(relpath)} is missing; add it")
            tiles = parse_tiles(self.ini(til))
            self._sheets[sheet] = cut_sprites(decode_sheet(self.read(png), self.where(png)), tiles, sheet, self.where(png))
        sprites = self._sheets[sheet]
        if index > len(sprites):
            raise SkingenError(f"{where}: sprite {sheet},{index} but res/{sheet}.til has {len(sprites)} sprite(s); fix the index")
        return sprites[index - 1]

    def font(self, name: str | None) -> bytes | None:
        """A font file the package ships (``FONT_NAME``), or None."""
        if name and f"res/{name}" in self.files:
            return self.read(f"res/{name}")
        return None

    # --- keyboards -----------------------------------------------------------------------------------------

    def keyboards(self, orientation: str) -> list[str]:
        """Names of the keyboard layouts of one orientation (root-level ones included)."""
        names = {PurePosixPath(f).stem for f in self.files
                 if f.lower().endswith(".ini") and (f.startswith(f"{orientation}/") or "/" not in f)}  # fmt: skip
        return sorted(names - {GENERAL_LAYOUT})

    def keyboard(self, name: str, orientation: str) -> Keyboard:
        if orientation not in ORIENTATIONS:
            raise SkingenError(f"--orientation {orientation}: use port or land")
        relpath = self.find(f"{name}.ini", orientation)
        if relpath is None:
            found = ", ".join(self.keyboards(orientation)) or "none"
            raise SkingenError(
                f"{self.where(f'{orientation}/{name}.ini')}: no such keyboard in the package; its {orientation} "
                f"keyboards: {found} (pick one with --keyboard, or --orientation)"
            )
        layout = self.ini(relpath)
        general_path = self.find(f"{GENERAL_LAYOUT}.ini", orientation)
        general = self.ini(general_path) if general_path else IniFile(self.where(f"{orientation}/gen.ini"), {})
        panel = layout.get("PANEL") or general.get("PANEL")
        keys = _keys(layout, panel, _offsets(general), self)
        size = _panel_size(layout, general, keys, relpath, self)
        back = (layout.get("PANEL") and layout.get("PANEL").get("BACK_STYLE")) or (
            general.get("PANEL") and general.get("PANEL").get("BACK_STYLE"))  # fmt: skip
        cand_section = layout.get("CAND") or general.get("CAND")
        return Keyboard(
            name=name, orientation=orientation, file=relpath, size=size, back=back, keys=keys,
            list_panel=_list_panel(layout.get("LIST")), candidate_bar=self._candidate_bar(cand_section, orientation),
        )  # fmt: skip

    def _candidate_bar(self, section: Section | None, orientation: str) -> CandidateBar | None:
        if section is None:
            return None
        rect = section.rect("VIEW_RECT")
        if rect is None:
            return None  # a bar that floats with the text cursor has no place on the panel
        file, back, icons = None, section.get("BACK_STYLE"), []
        name = section.get("LAYOUT_NAME")
        if name:
            name = name if name.lower().endswith(".cnd") else f"{name}.cnd"
            file = self.find(name, orientation)
            if file is None:
                self.warn(f"{section.where('LAYOUT_NAME')}: candidate bar file {name} is missing; the bar is drawn empty")
        if file is not None:
            cnd = self.ini(file)
            bar = cnd.get("CAND") or cnd.get("TAB")
            back = (bar.get("BACK_STYLE") if bar else None) or back
            icons = [_icon(s, rect) for _, s in cnd.numbered("ICON")]
            icons = [icon for icon in icons if icon is not None]
        return CandidateBar(section.where("VIEW_RECT"), file, rect, back, tuple(icons))


def _offsets(general: IniFile) -> dict[str, tuple[int, int]]:
    return {str(n): section.ints("POS", 2, "dx,dy") or (0, 0) for n, section in general.numbered("OFFSET")}


def _keys(layout: IniFile, panel: Section | None, offsets: dict, package: BdsPackage) -> tuple[Key, ...]:
    numbered = layout.numbered("KEY")
    declared = layout.get("PANEL").int("KEY_NUM") if layout.get("PANEL") else None
    if declared is not None:
        present = {n for n, _ in numbered}
        absent = [n for n in range(1, declared + 1) if n not in present]
        if absent:
            raise SkingenError(
                f"{layout.get('PANEL').where('KEY_NUM')}: KEY_NUM={declared} but [KEY{absent[0]}] is missing "
                f"({len(absent)} of the {declared} keys); add the sections or lower KEY_NUM"
            )
        numbered = [(n, s) for n, s in numbered if n <= declared]
    keys = []
    for _, section in numbered:
        rect = section.rect("VIEW_RECT") or section.rect("TOUCH_RECT")
        if rect is None:
            raise SkingenError(f"{section.where()}: [{section.name}] has no VIEW_RECT=x,y,w,h; add where the key is drawn")
        fores = tuple(s.strip() for s in (section.get("FORE_STYLE") or "").split(",") if s.strip())
        pos_types = [s.strip() for s in (section.get("POS_TYPE") or "").split(",")]
        shifts = []
        for i in range(len(fores)):
            pos = pos_types[i] if i < len(pos_types) else ""
            if pos and pos != "0" and pos not in offsets:
                package.warn(f"{section.where('POS_TYPE')}: POS_TYPE {pos} has no [OFFSET{pos}] in gen.ini; drawn centred")
            shifts.append(offsets.get(pos, (0, 0)))
        values = {k: section.get(k) for k in KEY_VALUES if section.get(k)}
        keys.append(Key(section.name, section.where(), rect, section.get("BACK_STYLE"), fores, tuple(shifts), values))
    return tuple(keys)


def _panel_size(layout: IniFile, general: IniFile, keys, relpath: str, package: BdsPackage) -> tuple[int, int]:
    for source in (layout, general):
        panel = source.get("PANEL")
        size = panel.ints("SIZE", 2, "width,height") if panel is not None else None
        if size is not None:
            if size[0] <= 0 or size[1] <= 0:
                raise SkingenError(f"{panel.where('SIZE')}: [PANEL] SIZE must be positive, got {panel.get('SIZE')}")
            return size
    if not keys:
        raise SkingenError(f"{package.where(relpath)}: no [PANEL] SIZE (here or in gen.ini) and no keys; nothing to draw")
    return max(k.rect[0] + k.rect[2] for k in keys), max(k.rect[1] + k.rect[3] for k in keys)


def _list_panel(section: Section | None) -> ListPanel | None:
    if section is None:
        return None
    cell_size = section.ints("CELL_SIZE", 2, "width,height")
    pos = section.ints("POS", 2, "x,y")
    if cell_size is None or pos is None:
        raise SkingenError(f"{section.where()}: [LIST] needs CELL_SIZE=w,h and POS=x,y; add them or remove the section")
    names = tuple((section.get("NAMES") or "").split())
    values = tuple((section.get("VALUES") or "").split())
    count = section.int("LIST_NUM", len(names))
    if count <= 0:
        return None
    horizontal = section.int("LIST_ORDER", 0) == 1
    w, h = cell_size
    cells = tuple((pos[0] + i * w * horizontal, pos[1] + i * h * (not horizontal), w, h) for i in range(count))
    return ListPanel(section.where(), cells, section.get("BACK_STYLE"), section.get("CELL_STYLE"),
                     section.get("FORE_STYLE"), names[:count], values[:count])  # fmt: skip


_ANCHORS = {n: ((n - 1) % 3 / 2, (n - 1) // 3 / 2) for n in range(1, 10)}  # 1 top-left ... 5 centre ... 9 bottom-right


def _icon(section: Section, bar: tuple[int, int, int, int]) -> Icon | None:
    """An icon placed by its anchor: the icon's own anchor point lands on the bar's anchor point shifted by POS."""
    size = section.ints("SIZE", 2, "width,height")
    if size is None:
        raise SkingenError(f"{section.where()}: [{section.name}] has no SIZE=w,h; add it")
    if section.int("PERSIST", 3) not in (1, 3):
        return None  # shown only while there are candidates (the panel is drawn without any)
    anchor = section.int("ANCHOR_TYPE", 1)
    if anchor not in _ANCHORS:
        raise SkingenError(f"{section.where('ANCHOR_TYPE')}: ANCHOR_TYPE must be 1..9 (1 top-left, 5 centre, 9 bottom-right), got {anchor}")
    fx, fy = _ANCHORS[anchor]
    dx, dy = section.ints("POS", 2, "dx,dy") or (0, 0)
    x = round(bar[0] + bar[2] * fx + dx - size[0] * fx)
    y = round(bar[1] + bar[3] * fy + dy - size[1] * fy)
    return Icon(section.name, section.where(), (x, y, *size), section.get("BACK_STYLE"), section.get("FORE_STYLE"),
                section.get("KEY") or "")  # fmt: skip
