"""The one checked dataset row: a raw row (one JSON object of ``train.jsonl`` or a loaded dataset) -> :class:`Row`.

Every stage that reads rows (training, caption, render_glyphs, inference, evaluate, dataset_tool) goes
through :func:`check_row`, so a row that trains also evaluates. A stage names the fields it needs
(:class:`RowSpec`); the rules for a field are the same everywhere:

- image paths: a non-empty string, relative to the dataset folder, inside it after resolving symlinks,
  naming a file whose header Pillow reads;
- ``text``: a string (non-empty where the stage needs a caption);
- ``box``: a list of 4-point quads ``[[x, y] x4]`` of finite numbers, each with a non-zero area, inside the
  image (a small tolerance for OCR quads touching the border);
- ``texts``: strings aligned with ``box``; when absent they come from ``writing "..."`` in the caption
  (:func:`skingen.data.writing.texts_from_caption`);
- ``seed``: a non-negative integer when present.

Problems come back all at once (:class:`BadRow`), one message per problem, each prefixed with the row's
``file:line``.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from ..errors import SkingenError
from .images import UnreadableImage, header_size
from .writing import texts_from_caption

# OCR quads of text touching the border can stick out by a pixel or two.
BOX_TOLERANCE_PX = 2.0
BOX_TOLERANCE_FRACTION = 0.01
# A box smaller than this (in square pixels) holds no readable text; the text loss and metrics cannot use it.
MIN_BOX_AREA = 1.0

IMAGE, CONDITIONING, TEXT, BOX, SEED = "image", "conditioning_image", "text", "box", "seed"


@dataclass(frozen=True)
class RowSpec:
    """What a stage reads from a row (``fields``) and which of those must be there (``required``)."""

    fields: frozenset[str]
    required: frozenset[str]

    def reads(self, name: str) -> bool:
        return name in self.fields


def _spec(fields: set[str], required: set[str]) -> RowSpec:
    return RowSpec(frozenset(fields), frozenset(required))


# The stages' needs. Training's row is the strictest: a row that trains passes every other stage's check.
TRAINING = _spec({IMAGE, CONDITIONING, TEXT, BOX}, {IMAGE, CONDITIONING, TEXT})
VALIDATE = TRAINING
CAPTION = _spec({IMAGE, TEXT, BOX}, {IMAGE})
RENDER = _spec({IMAGE}, {IMAGE})
INFERENCE = _spec({IMAGE, CONDITIONING, TEXT, BOX, SEED}, {CONDITIONING, TEXT})
EVALUATE = _spec({IMAGE, CONDITIONING, TEXT, BOX}, {IMAGE})

DEFAULT_KEYS: dict[str, tuple[str, ...]] = {IMAGE: ("image",), CONDITIONING: ("conditioning_image",), TEXT: ("text",)}


@dataclass(frozen=True)
class Problem:
    kind: str  # a short class name, counted in reports ("image not found", "bad box", ...)
    message: str


class BadRow(SkingenError):
    """A row with one or more problems; ``str()`` is one ``where: problem`` line per problem."""

    def __init__(self, where: str, problems: Sequence[Problem]):
        self.where = where
        self.problems = list(problems)
        super().__init__(self.describe())

    def lines(self) -> list[str]:
        return [f"{self.where}: {problem.message}" for problem in self.problems]

    def describe(self, indent: str = "") -> str:
        return "\n".join(indent + line for line in self.lines())


@dataclass(frozen=True)
class ImageRef:
    path: Any  # absolute path string (folders) or the stored image value (loaded datasets; after the scan only
    # its stored path: the training rows read the pixels from the dataset by row number)
    rel: str | None  # relative to the dataset folder (folders only)
    size: tuple[int, int]  # (w, h) as displayed


@dataclass
class Row:
    """A checked row. ``raw`` is the row as read (stages that rewrite rows update it and keep every field)."""

    where: str
    raw: dict
    row_id: str
    text: str | None = None
    image: ImageRef | None = None
    conditioning_images: tuple[ImageRef, ...] = ()
    box: list = field(default_factory=list)  # 4-point quads in the pixels of box_size
    texts: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def conditioning_image(self) -> ImageRef | None:
        return self.conditioning_images[0] if self.conditioning_images else None

    @property
    def box_size(self) -> tuple[int, int] | None:
        """(w, h) the boxes are measured in: the image's, else the (first) conditioning image's."""
        ref = self.image or self.conditioning_image
        return ref.size if ref else None


class FieldProblem(Exception):
    """One field's problem, raised by the field checks (:meth:`FolderImages.locate`, :func:`parse_boxes`, ...)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.problem = Problem(kind, message)


# ---------------------------------------------------------------------------------------------------------------
# Where images are: a dataset folder, or a loaded dataset's stored values


def _is_unsafe_relative(path: str) -> bool:
    if path.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", path) or os.path.isabs(path):
        return True
    return ".." in re.split(r"[\\/]", path)


class FolderImages:
    """Image paths relative to a dataset folder; a file opened once (a shared template) is not opened again.

    ``confined=False`` reads a rows file the user named on the command line as diffusers' trainers do
    (``--jsonl_for_train``): absolute paths, or paths relative to the file's folder, wherever they lead. The
    file's own row id is then the path as written (normalised)."""

    def __init__(self, base: str | os.PathLike, confined: bool = True):
        self.base = Path(base)
        self.real_base = self.base.resolve()
        self.confined = confined
        self._sizes: dict[Path, tuple[int, int]] = {}

    def locate(self, value: Any, key: str) -> ImageRef:
        if not isinstance(value, str) or not value.strip():
            shown = "missing" if value is None else f"a {type(value).__name__} ({_short(value)})"
            raise FieldProblem("bad path", f"{key!r} must be an image path relative to the dataset folder, got {shown}")
        if self.confined and _is_unsafe_relative(value):
            raise FieldProblem(
                "path outside dataset",
                f"{key!r} path {value!r} leaves the dataset folder (absolute or '..'); "
                f"make it relative to {self.base} and keep the file inside it",
            )
        rel = posixpath.normpath(os.path.expanduser(value).replace("\\", "/"))
        absolute = self.base / rel  # an absolute rel replaces the base
        real = absolute.resolve()
        if self.confined and real != self.real_base and self.real_base not in real.parents:
            raise FieldProblem(
                "path outside dataset",
                f"{key!r} file {value!r} is a symlink to {real}, outside the dataset folder {self.real_base}; "
                "copy the file into the folder instead of linking it",
            )
        if absolute not in self._sizes:
            if not absolute.is_file():
                raise FieldProblem("image not found", f"{key!r} file {value!r} not found (looked for {absolute})")
            try:
                self._sizes[absolute] = header_size(lambda: absolute)
            except UnreadableImage as err:
                raise FieldProblem(err.kind, f"{key!r} file {value!r} {err.reason}") from None
        return ImageRef(str(absolute), rel, self._sizes[absolute])


class StoredImages:
    """Images of an already-loaded dataset: ``{'bytes', 'path'}`` from an Image column, or path strings."""

    def locate(self, value: Any, key: str) -> ImageRef:
        if isinstance(value, str):
            value = {"bytes": None, "path": value}
        if not isinstance(value, dict) or (value.get("bytes") is None and not value.get("path")):
            raise FieldProblem("bad path", f"{key!r} holds no image ({type(value).__name__})")
        data = value.get("bytes")
        try:
            if data is not None:
                size = header_size(lambda: BytesIO(data))
            else:
                size = header_size(lambda: value["path"])
        except UnreadableImage as err:
            label = "image bytes" if data is not None else f"file {value['path']!r}"
            raise FieldProblem(err.kind, f"{key!r} {label} {err.reason}") from None
        return ImageRef(value, None, size)


# ---------------------------------------------------------------------------------------------------------------
# Boxes and texts


def _short(value: Any, limit: int = 60) -> str:
    try:
        shown = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def quad_area(quad: Sequence[Sequence[float]]) -> float:
    """Area of a 4-point box (shoelace formula), whatever the point order's direction."""
    return abs(0.5 * sum(quad[i][0] * quad[(i + 1) % 4][1] - quad[(i + 1) % 4][0] * quad[i][1] for i in range(4)))


def parse_boxes(raw: Any) -> list[list[list[float]]]:
    """``box`` as a list of 4-point float quads; a ``FieldProblem`` for anything else (first bad box named)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise FieldProblem(
            "bad box", f"'box' must be a list of 4-point quads [[x, y] x4], got a {type(raw).__name__} ({_short(raw)})"
        )
    quads = []
    for number, quad in enumerate(raw, start=1):
        shape_ok = isinstance(quad, list) and len(quad) == 4 and all(isinstance(p, list) and len(p) == 2 for p in quad)
        if not shape_ok or not all(_is_number(v) for point in quad for v in point):
            raise FieldProblem(
                "bad box",
                f"box {number} is {_short(quad)}: expected 4 [x, y] points like [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]",
            )
        if not all(math.isfinite(v) for point in quad for v in point):
            raise FieldProblem("bad box", f"box {number} has a coordinate that is not a finite number ({_short(quad)})")
        points = [[float(x), float(y)] for x, y in quad]
        area = quad_area(points)
        if area < MIN_BOX_AREA:
            raise FieldProblem(
                "empty box",
                f"box {number} {_short(quad)} has an area of {area:g} px² (its points are on a line or the same "
                "point); give the four corners of the text or drop the box and its text",
            )
        quads.append(points)
    return quads


def check_box_bounds(quads: list, size: tuple[int, int]) -> None:
    width, height = size
    tolerance = max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * max(width, height))
    for number, quad in enumerate(quads, start=1):
        for x, y in quad:
            if not (-tolerance <= x <= width + tolerance and -tolerance <= y <= height + tolerance):
                raise FieldProblem(
                    "box outside image",
                    f"box {number} point ({x:g}, {y:g}) lies outside the {width}x{height} image "
                    f"(tolerance {tolerance:g} px); boxes are in the image's own pixels",
                )


def row_texts(raw_texts: Any, quads: list, caption: str | None) -> list[str]:
    """The strings of the boxes: ``texts``, else ``writing "..."`` in the caption; a ``FieldProblem`` unless one per box."""
    if raw_texts is None:
        texts = texts_from_caption(caption, box_count=len(quads)) if quads and caption else []
        if len(texts) != len(quads):
            raise FieldProblem(
                "texts/box mismatch",
                f'{len(quads)} box(es) but the caption names {len(texts)} text(s) with writing "..." (neither '
                "one quoted string per box nor one space-separated word per box) and the row has no 'texts'; "
                "add 'texts' aligned with 'box'",
            )
        return texts
    if not isinstance(raw_texts, list) or not all(isinstance(t, str) for t in raw_texts):
        raise FieldProblem("texts/box mismatch", f"'texts' must be a list of strings, got {_short(raw_texts)}")
    if len(raw_texts) != len(quads):
        raise FieldProblem(
            "texts/box mismatch",
            f"'texts' has {len(raw_texts)} entries but 'box' has {len(quads)}; they must align one text per box",
        )
    return list(raw_texts)


def check_boxes_and_texts(
    raw_box: Any, raw_texts: Any, caption: str | None, size: tuple[int, int] | None, where: str
) -> tuple[list, list[str]]:
    """Boxes and their texts of a record that is not a dataset row (e.g. an inference ``results.jsonl`` line),
    by the dataset rows' rules; :class:`BadRow` naming ``where`` otherwise."""
    problems: list[Problem] = []
    quads, texts = _boxes_and_texts(raw_box, raw_texts, caption, size, problems)
    if problems:
        raise BadRow(where, problems)
    return quads, texts


def _boxes_and_texts(raw_box, raw_texts, caption, size, problems: list[Problem]) -> tuple[list, list[str]]:
    try:
        quads = parse_boxes(raw_box)
        if quads and size is not None:
            check_box_bounds(quads, size)
    except FieldProblem as err:
        problems.append(err.problem)
        return [], []
    try:
        return quads, row_texts(raw_texts, quads, caption)
    except FieldProblem as err:
        problems.append(err.problem)
        return quads, []


# ---------------------------------------------------------------------------------------------------------------
# The row


def _first_present(obj: dict, keys: Sequence[str]) -> str | None:
    return next((key for key in keys if key in obj and obj[key] is not None), None)


def check_row(
    raw: Any,
    dataset_dir: str | os.PathLike | None,
    where: str,
    *,
    spec: RowSpec = TRAINING,
    keys: dict[str, tuple[str, ...]] | None = None,
    extra_conditioning_keys: Sequence[str | tuple[str, ...]] = (),
    images: FolderImages | StoredImages | None = None,
    default_row_id: Callable[[ImageRef | None], str] | None = None,
) -> Row:
    """Check one raw row for a stage (``spec``); its :class:`Row`, or :class:`BadRow` listing every problem.

    ``dataset_dir``: the folder image paths are relative to (``images`` may bring a shared :class:`FolderImages`
    for it, or :class:`StoredImages` for a loaded dataset). ``keys``: the row keys of each role
    (``image``, ``conditioning_image``, ``text``; several candidates allowed, the first present is used).
    ``extra_conditioning_keys``: further conditioning images (one per extra ControlNet), required like the first;
    each a key or a tuple of candidate keys (the first present is used).
    """
    if not isinstance(raw, dict):
        raise BadRow(where, [Problem("invalid JSON", f"expected a JSON object, got {type(raw).__name__}")])
    keys = {**DEFAULT_KEYS, **(keys or {})}
    images = images if images is not None else FolderImages(dataset_dir)
    problems: list[Problem] = []
    found = {role: _first_present(raw, keys[role]) for role in (IMAGE, CONDITIONING, TEXT) if spec.reads(role)}
    extra = [(key,) if isinstance(key, str) else tuple(key) for key in extra_conditioning_keys]
    extra_found = [(candidates[0], _first_present(raw, candidates)) for candidates in extra]
    missing = [keys[role][0] for role, key in found.items() if key is None and role in spec.required]
    missing += [name for name, key in extra_found if key is None]
    if missing:
        present = ", ".join(sorted(raw)) or "none"
        problems.append(
            Problem("missing key", f"missing {', '.join(repr(k) for k in missing)} (keys in this row: {present})")
        )

    caption = None
    if found.get(TEXT) is not None:
        value = raw[found[TEXT]]
        if not isinstance(value, str):
            problems.append(
                Problem("bad caption", f"caption {found[TEXT]!r} must be a string, got {type(value).__name__}")
            )
        elif TEXT in spec.required and not value.strip():
            problems.append(
                Problem("empty caption", f"empty caption in {found[TEXT]!r}; fill it (caption.py) or drop the row")
            )
        else:
            caption = value

    located: dict[str, ImageRef] = {}
    for role, key in [(r, found.get(r)) for r in (IMAGE, CONDITIONING)] + [
        (f"{CONDITIONING}:{name}", key) for name, key in extra_found
    ]:
        if key is None or raw.get(key) is None:
            continue
        try:
            located[role] = images.locate(raw[key], key)
        except FieldProblem as err:
            problems.append(err.problem)

    quads, texts = [], []
    if spec.reads(BOX):
        reference = located.get(IMAGE) or located.get(CONDITIONING)
        quads, texts = _boxes_and_texts(
            raw.get("box"), raw.get("texts"), caption, reference and reference.size, problems
        )

    seed = raw.get("seed") if spec.reads(SEED) else None
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        problems.append(Problem("bad seed", f"'seed' must be a non-negative integer, got {_short(seed)}"))

    if problems:
        raise BadRow(where, problems)
    image = located.get(IMAGE)
    if image is not None and image.rel is not None:
        row_id = image.rel
    elif isinstance(raw.get("row_id"), str) and raw["row_id"]:
        row_id = raw["row_id"]
    else:
        row_id = default_row_id(image) if default_row_id else where
    conditioning = tuple(
        located[role]
        for role in [CONDITIONING] + [f"{CONDITIONING}:{name}" for name, _ in extra_found]
        if role in located
    )
    return Row(
        where=where,
        raw=raw,
        row_id=row_id,
        text=caption,
        image=image,
        conditioning_images=conditioning,
        box=quads,
        texts=texts,
        seed=seed,
    )


def box_problem(quad: Any, size: tuple[int, int]) -> str | None:
    """Why a single box (e.g. an OCR quad about to be written) would fail the row check, or None when it passes."""
    try:
        check_box_bounds(parse_boxes([quad]), size)
    except FieldProblem as err:
        return err.problem.kind
    return None
