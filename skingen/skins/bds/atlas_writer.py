"""An atlas merged from a Baidu package (``--element_map baidu``), e.g. a generated one, written back into that
package as a ``.bds``: each atlas element drawn from one style alone (a key background, the panel or candidate
bar background) gives that style a new sprite, cut out by :func:`skingen.skins.atlas.split_atlas` at the source
sprite's size with its stretch middle (``INNER_RECT``) kept; styles are changed wherever the package uses them.
Elements drawn from several layers (a background with an icon or a label) cannot be separated again, so their
styles keep the source's sprites, and so do styles no element showed; :func:`write_atlas_bds` says which."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from PIL import Image

from ..atlas import split_atlas
from ..element_maps import MANIFEST_NAME
from ..layout import Layout
from ..ninepatch import parse_ninepatch
from .archive import info_txt, png_bytes, write_bds
from .ini import format_ini
from .resources import pack_sheet, pressed, til_sections
from .views import BdsElementFiles

ATLAS_SHEET = "skingen_atlas"


def _sprite_from_split(path: Path, ninepatch: bool) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """A split element file as a sprite: its pixels, and its stretch middle when it was written as a 9-patch."""
    with Image.open(path) as opened:
        image = opened.convert("RGBA")
    if not ninepatch:
        return image, None
    patch = parse_ninepatch(image, source=str(path))
    return patch.image, (patch.stretch_x[0][0], patch.stretch_y[0][0], patch.stretch_x[-1][1], patch.stretch_y[-1][1])


def write_atlas_bds(atlas: Image.Image, layout: Layout, elements: list[dict], alpha: Image.Image | None,
                    source: str | Path, out_path: Path, name: str) -> tuple[Path, list[str]]:
    """The .bds and the ids of the elements whose styles kept the source's sprites."""
    new: dict[str, tuple[Image.Image, tuple | None]] = {}
    kept = []
    with tempfile.TemporaryDirectory() as tmp, BdsElementFiles(source) as views:
        split_dir = Path(tmp) / "split"
        split_atlas(atlas, layout, split_dir, record=elements, alpha=alpha, name=name)
        files_of = yaml.safe_load((split_dir / MANIFEST_NAME).read_text(encoding="utf-8"))["elements"]
        for element in elements:
            view = views.views.get(element.get("source", ""))
            single = len(element.get("layers", [])) == 1
            if view is None or view.style is None or view.layer != "back" or not single or element["id"] not in files_of:
                kept.append(element["id"])
                continue
            if view.style not in new:
                new[view.style] = _sprite_from_split(split_dir / files_of[element["id"]], element.get("ninepatch") is not None)
        package = views.bds
        files = {relpath: package.read(relpath) for relpath in sorted(package.files)}
        order = list(new)
        sheet, rects = pack_sheet([new[s][0] for s in order], 256)
        til = format_ini(til_sections(rects, [new[s][1] for s in order]))
        for sheet_name, picture in ((ATLAS_SHEET, sheet), (f"{ATLAS_SHEET}_hl", pressed(sheet))):
            files[f"res/{sheet_name}.png"], files[f"res/{sheet_name}.til"] = png_bytes(picture), til
        css = package.ini("res/default.css")
        sections = []
        for section_name, section in css.sections.items():
            values = {key: value for key, (value, _) in section.values.items()}
            style_id = section_name[len("STYLE"):] if section_name.startswith("STYLE") else None
            if style_id in new:
                index = order.index(style_id) + 1
                values.update(NM_IMG=f"{ATLAS_SHEET},{index}", HL_IMG=f"{ATLAS_SHEET}_hl,{index}")
            sections.append((section_name, values))
        files["res/default.css"] = format_ini(sections)
        info = package.info()
        info["Name"] = name
        files["Info.txt"] = info_txt(info)
    return write_bds(out_path, files), kept
