"""A Baidu package seen as element files, so the atlas layouts and ``--element_map baidu`` merge it.

The package's styles have no file names an element map could match, so each keyboard offers named views of
them, as files under ``baidu/<orientation>/<keyboard>/``: ``<role>.back.png`` (the background style of the first
key of that role, a 9-slice sprite stays stretchable) and ``<role>.fore.png`` (its first sprite foreground),
``panel.back.png``, ``candidate_bar.back.png``, ``list.back.png``, and, drawn by :mod:`skingen.skins.bds.render`,
``keyboard.png`` (the whole keyboard), ``letter_keys.png`` and ``function_row.png`` (its letter area and bottom
row). A key's role comes from its values: ``letter``, ``digit``, ``comma``, ``period``, or the function code's
(``F36`` delete, ``F38`` space, ``F39`` enter, ``F10``/``F11`` shift, ``F6`` num, ``F1`` symbol, ``F15``/``F16``/``F62``
lang, ``F7`` emoji). ``configs/element_maps/baidu.yaml`` maps the layouts' elements to these names.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ...errors import SkingenError
from ..ninepatch import NinePatch
from ..package import SkinPackage, open_package
from .package import ORIENTATIONS, BdsPackage, Key, Keyboard, is_bds_package
from .render import render_keyboard

VIEW_ROOT = "baidu"
ROLE_OF_FUNCTION = {"F36": "delete", "F37": "delete", "F38": "space", "F39": "enter", "F10": "shift", "F11": "shift",
                    "F6": "num", "F1": "symbol", "F15": "lang", "F16": "lang", "F62": "lang", "F7": "emoji"}  # fmt: skip
ROLE_OF_CHARACTER = {",": "comma", "，": "comma", ".": "period", "。": "period"}
WHOLE_VIEWS = ("keyboard", "letter_keys", "function_row")


def key_role(key: Key) -> str:
    centre = key.values.get("CENTER", "").strip()
    if centre.upper() in ROLE_OF_FUNCTION:
        return ROLE_OF_FUNCTION[centre.upper()]
    if centre in ROLE_OF_CHARACTER:
        return ROLE_OF_CHARACTER[centre]
    if re.fullmatch(r"[A-Za-z]", centre):
        return "letter"
    if re.fullmatch(r"[0-9]", centre):
        return "digit"
    return "other"


@dataclass(frozen=True)
class View:
    """One named view: a style's sprite (``style`` set) or a drawn region of a keyboard (``region``)."""

    keyboard: Keyboard
    style: str | None = None
    layer: str = "back"
    where: str = ""
    region: str | None = None


class BdsElementFiles:
    """Duck-types :class:`skingen.skins.package.SkinPackage` for :func:`skingen.skins.atlas.compose_package`."""

    def __init__(self, path: str | os.PathLike):
        self.bds = BdsPackage(path)
        self.path, self.name = self.bds.path, self.bds.name
        self.views: dict[str, View] = {}
        self._cache: dict[str, Image.Image | NinePatch] = {}
        for orientation in ORIENTATIONS:
            for name in self.bds.keyboards(orientation):
                self._add_keyboard(self.bds.keyboard(name, orientation))
        self.files = sorted(self.views)

    def _add(self, relpath: str, view: View) -> None:
        self.views.setdefault(relpath, view)

    def _add_keyboard(self, keyboard: Keyboard) -> None:
        base = f"{VIEW_ROOT}/{keyboard.orientation}/{keyboard.name}"
        where = self.bds.where(keyboard.file)
        if keyboard.back:
            self._add(f"{base}/panel.back.png", View(keyboard, keyboard.back, "back", f"{where}: [PANEL]"))
        if keyboard.candidate_bar and keyboard.candidate_bar.back:
            self._add(f"{base}/candidate_bar.back.png", View(keyboard, keyboard.candidate_bar.back, "back", keyboard.candidate_bar.where))
        if keyboard.list_panel and keyboard.list_panel.back:
            self._add(f"{base}/list.back.png", View(keyboard, keyboard.list_panel.back, "back", keyboard.list_panel.where))
        for key in keyboard.keys:
            role = key_role(key)
            if key.back:
                self._add(f"{base}/{role}.back.png", View(keyboard, key.back, "back", key.where))
            for fore in key.fores:
                style = self.bds.style(fore, key.where)
                if style is not None and style.normal is not None:
                    self._add(f"{base}/{role}.fore.png", View(keyboard, fore, "fore", key.where))
                    break
        for region in WHOLE_VIEWS:
            self._add(f"{base}/{region}.png", View(keyboard, region=region))

    def close(self) -> None:
        self.bds.close()

    def __enter__(self) -> BdsElementFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def manifest(self, layout) -> None:
        return None

    def load_element(self, relpath: str) -> Image.Image | NinePatch:
        if relpath not in self._cache:
            view = self.views[relpath]
            if view.region is not None:
                self._cache[relpath] = self._region(view)
            else:
                style = self.bds.style(view.style, view.where)
                if style is None or style.normal is None:
                    colour = style.colour if style is not None and style.colour else (0, 0, 0, 0)
                    self._cache[relpath] = Image.new("RGBA", (16, 16), colour)
                else:
                    sprite = self.bds.sprite(style.normal, style.where)
                    self._cache[relpath] = sprite.drawable() if view.layer == "back" and sprite.inner else sprite.image
        return self._cache[relpath]

    def image_size(self, relpath: str) -> tuple[int, int]:
        element = self.load_element(relpath)
        return (element.image if isinstance(element, NinePatch) else element).size

    def _region(self, view: View) -> Image.Image:
        rendered = render_keyboard(self.bds, view.keyboard).image.convert("RGBA")
        if view.region == "keyboard":
            return rendered
        x0, y0 = view.keyboard.canvas[:2]
        keys = [k for k in view.keyboard.keys if key_role(k) == "letter"]
        if view.region == "function_row" and view.keyboard.keys:
            bottom = max(k.rect[1] for k in view.keyboard.keys)
            keys = [k for k in view.keyboard.keys if k.rect[1] == bottom]
        if not keys:
            return rendered
        left, top = min(k.rect[0] for k in keys) - x0, min(k.rect[1] for k in keys) - y0
        right, bottom = max(k.rect[0] + k.rect[2] for k in keys) - x0, max(k.rect[1] + k.rect[3] for k in keys) - y0
        return rendered.crop((left, top, right, bottom))

    @property
    def warnings(self) -> list[str]:
        return self.bds.warnings


def open_any_package(path: str | os.PathLike) -> SkinPackage | BdsElementFiles:
    """A Baidu skin as its element views, any other package as files (:func:`skingen.skins.package.open_package`)."""
    if not Path(path).exists():
        raise SkingenError(f"{path}: skin package not found")
    return BdsElementFiles(path) if is_bds_package(path) else open_package(path)
