"""The one dataset loader: our ``train.jsonl`` folder, Hugging Face ImageFolder ``metadata.jsonl``, or a hub dataset.

Every form comes out with the same columns (see docs/architecture.md, "Dataset rows"):
``image`` and ``conditioning_image`` (Image features, decoded lazily to RGB), ``text``, ``box``
(4-point quads in the original image's pixels), ``texts`` (aligned with ``box``) and ``row_id``.
Rows are checked up front so a bad row is reported with its file and line before training starts.
Also here: RGB conversion and the one checked image opener (:func:`open_rgb`), the lenient row
reader/writer of the preparation stages, and validate / convert / split for ``dataset_tool.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

import datasets

from .errors import SkingenError
from .fileio import AtomicDirectory, iter_jsonl, read_jsonl, write_jsonl

SPLITS = ("train", "validation")
ON_BAD_SAMPLE = ("error", "skip")
MAX_LISTED_PROBLEMS = 10
# OCR quads of text touching the border can stick out by a pixel or two.
BOX_TOLERANCE_PX = 2.0
BOX_TOLERANCE_FRACTION = 0.01
EXIF_ORIENTATION = 0x0112
# What Pillow raises for a file that is not a (complete, sane) image; UnidentifiedImageError is an OSError.
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
ROW_KEYS = ("image", "conditioning_image", "text", "box", "texts", "row_id")

# Keys each form uses for the three required roles. ImageFolder also accepts the names `datasets` gives
# its columns after loading ("image", "conditioning_image"), so diffusers-style column flags keep working.
DEFAULT_COLUMNS = {
    "jsonl": {"image": "image", "conditioning_image": "conditioning_image", "text": "text"},
    "imagefolder": {"image": "file_name", "conditioning_image": "conditioning_image_file_name", "text": "text"},
    "hub": {"image": "image", "conditioning_image": "conditioning_image", "text": "text"},
}
FLAG_OF_ROLE = {
    "image": "--image_column",
    "conditioning_image": "--conditioning_image_column",
    "text": "--caption_column",
}

LAYOUT_HELP = (
    "expected either train.jsonl (one JSON object per line: text, image, conditioning_image, optional box/texts; "
    "paths relative to the folder) or a Hugging Face ImageFolder metadata.jsonl (file_name, "
    "conditioning_image_file_name, text)"
)


# ---------------------------------------------------------------------------------------------------------------
# RGB conversion, applied whenever an image is decoded


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB the way a viewer shows it.

    EXIF orientation is applied; transparency (RGBA, LA, palette/RGB with a transparent colour) is composited
    on white, since skin elements are drawn on white pages; 16-bit and 32-bit grey are scaled, not clipped.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if values.max(initial=0) <= 1.0:
            values = values * 255.0  # float images in 0..1
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike, where: str | None = None) -> Image.Image:
    """An image file as RGB (:func:`to_rgb`); a missing or unreadable file is a SkingenError naming the file and
    ``where`` it was listed (e.g. ``train.jsonl row 3``)."""
    prefix = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise SkingenError(
            f"{prefix}image {path} not found; fix the path (relative paths start at the folder of the file that "
            "lists them) or drop the row"
        )
    try:
        with Image.open(path) as image:
            image.load()  # read the pixels before the file closes: to_rgb returns an RGB image as it is
            return to_rgb(image)
    except IMAGE_READ_ERRORS as err:
        raise SkingenError(
            f"{prefix}image {path} is not a readable image ({err}); replace it or drop the row"
        ) from None


class RGBImage(datasets.Image):
    """A ``datasets.Image`` feature that decodes to RGB through :func:`to_rgb`.

    It is an ``Image`` feature (``isinstance`` holds, ``cast_column``/``map``/``filter``/``select`` keep it), so
    users see an ordinary lazily decoded image column. Saved with ``save_to_disk`` it reloads as a plain ``Image``.
    """

    def decode_example(self, value, token_per_repo_id=None) -> Image.Image:
        return to_rgb(super().decode_example(value, token_per_repo_id=token_per_repo_id))


def row_features() -> datasets.Features:
    return datasets.Features(
        {
            "image": RGBImage(),
            "conditioning_image": RGBImage(),
            "text": datasets.Value("string"),
            "box": datasets.List(datasets.List(datasets.List(datasets.Value("float32")))),
            "texts": datasets.List(datasets.Value("string")),
            "row_id": datasets.Value("string"),
        }
    )


# ---------------------------------------------------------------------------------------------------------------
# Captions

_QUOTED = r'"[^"]*"|“[^”]*”'
_WRITING = re.compile(rf"writing\s*((?:(?:{_QUOTED})\s*(?:(?:,|，|、|and|&|和)\s*)?)+)", re.IGNORECASE)


def texts_from_caption(caption: str, box_count: int | None = None) -> list[str]:
    """The strings a caption asks to be written: ``writing "前往"`` -> ``["前往"]``.

    Several are allowed, in order: ``writing "a", writing "b"`` or ``writing "a" and "b"`` or ``writing "a" "b"``.
    Straight and curly double quotes both work; empty quotes are ignored.

    caption.py writes all of a row's texts in one quoted string joined by spaces (``writing "前往 搜索"``).
    With ``box_count`` (the row's number of boxes), when the quoted strings are not one per box but their
    space-separated words are, the words are returned: ``("writing \"前往 搜索\"", 2)`` -> ``["前往", "搜索"]``.
    """
    quoted = [inner for match in _WRITING.finditer(caption or "") for inner in _quoted_texts(match.group(1))]
    if box_count is not None and len(quoted) != box_count:
        words = [word for text in quoted for word in text.split()]
        if len(words) == box_count:
            return words
    return quoted


def _quoted_texts(phrase: str) -> list[str]:
    inner = (quoted[1:-1].strip() for quoted in re.findall(_QUOTED, phrase))
    return [text for text in inner if text]


# ---------------------------------------------------------------------------------------------------------------
# Where a dataset folder keeps its rows


@dataclass(frozen=True)
class DatasetFiles:
    """The rows file of one split of a dataset folder."""

    root: Path  # the dataset folder; row ids are paths relative to it
    form: str  # "jsonl" or "imagefolder"
    split: str
    rows_file: Path  # train.jsonl / validation.jsonl, or an ImageFolder metadata.jsonl
    base: Path  # the folder the rows' image paths are relative to


def find_dataset_files(dataset_dir: str | os.PathLike, split: str = "train") -> DatasetFiles:
    """Decide which form a dataset folder is in (our ``<split>.jsonl`` wins over ImageFolder ``metadata.jsonl``)."""
    if split not in SPLITS:
        raise SkingenError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    path = Path(dataset_dir).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        form = "imagefolder" if path.name == "metadata.jsonl" else "jsonl"
        return DatasetFiles(root=path.parent, form=form, split=split, rows_file=path, base=path.parent)
    if not path.is_dir():
        raise SkingenError(f"{path}: dataset folder not found; {LAYOUT_HELP}")
    own = path / f"{split}.jsonl"
    if own.is_file():
        if (path / "metadata.jsonl").is_file():
            print(f"note: {path} holds both {own.name} and metadata.jsonl; reading {own.name}", file=sys.stderr)
        return DatasetFiles(root=path, form="jsonl", split=split, rows_file=own, base=path)
    if split == "train" and (path / "metadata.jsonl").is_file():
        return DatasetFiles(root=path, form="imagefolder", split=split, rows_file=path / "metadata.jsonl", base=path)
    if (path / split / "metadata.jsonl").is_file():
        return DatasetFiles(
            root=path, form="imagefolder", split=split, rows_file=path / split / "metadata.jsonl", base=path / split
        )
    found = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in path.iterdir())
    listing = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "") if found else "nothing"
    hint = ""
    if any(name.endswith(".py") for name in found):
        hint = (
            "; dataset loading scripts (*.py) are no longer supported by `datasets` (>= 4.0): "
            "describe the rows in train.jsonl instead"
        )
    raise SkingenError(
        f"{path}: no {split}.jsonl or {split} metadata.jsonl here (found: {listing}); {LAYOUT_HELP}{hint}"
    )


def existing_splits(dataset_dir: str | os.PathLike) -> list[str]:
    """The splits a dataset folder has, ``train`` first."""
    splits = []
    for split in SPLITS:
        try:
            find_dataset_files(dataset_dir, split)
        except SkingenError:
            continue
        splits.append(split)
    return splits


# ---------------------------------------------------------------------------------------------------------------
# Row checks, shared by every form


@dataclass
class BadRow:
    where: str  # "file:line" or "<dataset> row N"
    problems: list[tuple[str, str]]  # (kind, message)

    def describe(self) -> str:
        return f"{self.where}: " + "; ".join(message for _, message in self.problems)


@dataclass
class GoodRow:
    index: int  # position among the source's rows (lines for files)
    image: Any  # absolute path (folders) or the source's stored image value (hub)
    conditioning_image: Any
    text: str
    box: list
    texts: list[str]
    row_id: str
    image_rel: str | None = None  # paths relative to the split's base folder (folders only)
    conditioning_rel: str | None = None
    raw: dict = field(default_factory=dict)


@dataclass
class ScanResult:
    source: str
    total: int = 0
    good: list[GoodRow] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    image_sizes: Counter = field(default_factory=Counter)
    conditioning_sizes: Counter = field(default_factory=Counter)
    size_mismatches: int = 0


class _Problem(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """Size as displayed: EXIF orientations 5-8 swap width and height."""
    width, height = image.size
    if image.format == "PNG" and "exif" not in image.info:
        # A PNG's EXIF may follow the pixel data, and reading it would decode the whole image; the box check can
        # miss such a rare rotation (decoding still applies it).
        return width, height
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block only loses the orientation, as in viewers
        orientation = None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _header_size(opener: Callable[[], Any], label: str) -> tuple[int, int]:
    """Open just the image header (cheap, no pixel decode) to check the file is an image and read its size."""
    try:
        with Image.open(opener()) as image:
            return _oriented_size(image)
    except FileNotFoundError:
        raise _Problem("image not found", f"{label} not found") from None
    except IMAGE_READ_ERRORS as err:
        raise _Problem("unreadable image", f"{label} is not a readable image ({err})") from None


def _is_unsafe_relative(path: str) -> bool:
    if path.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", path) or os.path.isabs(path):
        return True
    return ".." in re.split(r"[\\/]", path)


def _folder_image(base: Path, key: str) -> Callable[[Any], tuple[Any, str | None, tuple[int, int]]]:
    sizes: dict[Path, tuple[int, int]] = {}  # a shared conditioning image (template mode) is opened once

    def locate(value: Any) -> tuple[Any, str | None, tuple[int, int]]:
        if not isinstance(value, str) or not value.strip():
            raise _Problem("missing key", f"{key!r} must be a relative path string, got {value!r}")
        if _is_unsafe_relative(value):
            raise _Problem(
                "path outside dataset",
                f"{key!r} path {value!r} leaves the dataset folder (absolute or '..'); "
                f"make it relative to {base} and keep the file inside it",
            )
        rel = posixpath.normpath(value.replace("\\", "/"))
        absolute = base / rel
        if absolute not in sizes:
            if not absolute.is_file():
                raise _Problem("image not found", f"{key!r} file {value!r} not found (looked for {absolute})")
            sizes[absolute] = _header_size(lambda: absolute, f"{key!r} file {value!r}")
        return str(absolute), rel, sizes[absolute]

    return locate


def _stored_image(key: str) -> Callable[[Any], tuple[Any, str | None, tuple[int, int]]]:
    """Images of an already-loaded dataset: {'bytes', 'path'} from an Image column, or path strings."""

    def locate(value: Any) -> tuple[Any, str | None, tuple[int, int]]:
        if isinstance(value, str):
            value = {"bytes": None, "path": value}
        if not isinstance(value, dict) or (value.get("bytes") is None and not value.get("path")):
            raise _Problem("missing key", f"{key!r} holds no image ({type(value).__name__})")
        if value.get("bytes") is not None:
            data = value["bytes"]
            size = _header_size(lambda: BytesIO(data), f"{key!r} image bytes")
        else:
            path = value["path"]
            size = _header_size(lambda: path, f"{key!r} file {path!r}")
        return value, None, size

    return locate


def _parse_boxes(raw: Any) -> list[list[list[float]]]:
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raise _Problem("bad box", f"'box' must be a list of 4-point quads [[x, y] x4], got {type(raw).__name__}")
    quads = []
    for number, quad in enumerate(raw, start=1):
        ok = isinstance(quad, (list, tuple)) and len(quad) == 4
        points = []
        for point in quad if ok else []:
            if (
                not isinstance(point, (list, tuple))
                or len(point) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in point)
            ):
                ok = False
                break
            points.append([float(point[0]), float(point[1])])
        if not ok:
            shown = json.dumps(quad, ensure_ascii=False)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise _Problem(
                "bad box",
                f"box {number} is {shown}: expected 4 [x, y] points like [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]",
            )
        quads.append(points)
    return quads


def _check_box_bounds(quads: list, size: tuple[int, int]) -> None:
    width, height = size
    tolerance = max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * max(width, height))
    for number, quad in enumerate(quads, start=1):
        for x, y in quad:
            if not (-tolerance <= x <= width + tolerance and -tolerance <= y <= height + tolerance):
                raise _Problem(
                    "box outside image",
                    f"box {number} point ({x:g}, {y:g}) lies outside the {width}x{height} image "
                    f"(tolerance {tolerance:g} px); boxes are in the image's own pixels",
                )


def _first_present(obj: dict, keys: tuple[str, ...]) -> str | None:
    return next((key for key in keys if key in obj and obj[key] is not None), None)


def _check_record(
    obj: dict,
    keys: dict[str, tuple[str, ...]],
    locators: dict[str, Callable],
    default_row_id: Callable[[Any], str],
) -> tuple[dict | None, list[tuple[str, str]]]:
    """Check one row; return its normalised fields, or None and every problem found."""
    problems: list[tuple[str, str]] = []
    found = {role: _first_present(obj, candidates) for role, candidates in keys.items()}
    missing = [keys[role][0] for role, key in found.items() if key is None]
    if missing:
        present = ", ".join(sorted(obj)) or "none"
        problems.append(("missing key", f"missing {', '.join(repr(k) for k in missing)} (keys in this row: {present})"))

    caption = obj.get(found["text"]) if found["text"] else None
    if found["text"] is not None:
        if not isinstance(caption, str):
            problems.append(
                ("bad caption", f"caption {found['text']!r} must be a string, got {type(caption).__name__}")
            )
            caption = None
        elif not caption.strip():
            problems.append(
                ("empty caption", f"empty caption in {found['text']!r}; fill it (caption.py) or drop the row")
            )

    located = {}
    for role in ("image", "conditioning_image"):
        if found[role] is None:
            continue
        try:
            located[role] = locators[role](obj[found[role]])
        except _Problem as problem:
            problems.append((problem.kind, problem.message))

    quads: list = []
    try:
        quads = _parse_boxes(obj.get("box"))
        if quads and "image" in located:
            _check_box_bounds(quads, located["image"][2])
    except _Problem as problem:
        problems.append((problem.kind, problem.message))

    texts = obj.get("texts")
    if texts is None:
        texts = texts_from_caption(caption, box_count=len(quads)) if quads and caption else []
        if len(texts) != len(quads) and "bad box" not in {kind for kind, _ in problems}:
            problems.append(
                (
                    "texts/box mismatch",
                    f'{len(quads)} box(es) but the caption names {len(texts)} text(s) with writing "..." (neither '
                    "one quoted string per box nor one space-separated word per box) and the row has no 'texts'; "
                    "add 'texts' aligned with 'box'",
                )
            )
    elif not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        problems.append(
            (
                "texts/box mismatch",
                f"'texts' must be a list of strings, got {json.dumps(texts, ensure_ascii=False)[:60]}",
            )
        )
    elif len(texts) != len(quads):
        problems.append(
            (
                "texts/box mismatch",
                f"'texts' has {len(texts)} entries but 'box' has {len(quads)}; they must align one text per box",
            )
        )

    if problems:
        return None, problems
    image_value, image_rel, image_size = located["image"]
    cond_value, cond_rel, cond_size = located["conditioning_image"]
    return {
        "image": image_value,
        "conditioning_image": cond_value,
        "image_rel": image_rel,
        "conditioning_rel": cond_rel,
        "image_size": image_size,
        "conditioning_size": cond_size,
        "text": caption,
        "box": quads,
        "texts": list(texts),
        "row_id": image_rel if image_rel is not None else default_row_id(image_value),
    }, []


def _accumulate(
    result: ScanResult, index: int, where: str, checked: dict | None, problems, obj: dict, seen: dict
) -> None:
    if checked is not None and checked["row_id"] in seen:
        problems = [
            (
                "duplicate row",
                f"image {checked['row_id']!r} is already used by {seen[checked['row_id']]}; each row needs its own image",
            )
        ]
        checked = None
    if checked is None:
        result.bad.append(BadRow(where, problems))
        return
    seen[checked["row_id"]] = where
    result.image_sizes["{}x{}".format(*checked["image_size"])] += 1
    result.conditioning_sizes["{}x{}".format(*checked["conditioning_size"])] += 1
    if checked["image_size"] != checked["conditioning_size"]:
        result.size_mismatches += 1
    result.good.append(
        GoodRow(
            index=index,
            image=checked["image"],
            conditioning_image=checked["conditioning_image"],
            text=checked["text"],
            box=checked["box"],
            texts=checked["texts"],
            row_id=checked["row_id"],
            image_rel=checked["image_rel"],
            conditioning_rel=checked["conditioning_rel"],
            raw=obj,
        )
    )


def _role_keys(form: str, image_column, conditioning_image_column, caption_column) -> dict[str, tuple[str, ...]]:
    given = {"image": image_column, "conditioning_image": conditioning_image_column, "text": caption_column}
    keys = {}
    for role, default in DEFAULT_COLUMNS[form].items():
        name = given[role] or default
        candidates = [name]
        if form == "imagefolder" and role != "text":
            # `datasets` names ImageFolder columns without the "_file_name" suffix ("file_name" becomes "image").
            candidates.append("file_name" if name == "image" else f"{name}_file_name")
        keys[role] = tuple(dict.fromkeys(candidates))
    return keys


def _progress(iterable: Iterable, total: int | None, desc: str) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None if (total or 0) > 2000 else True)


def scan_folder(
    files: DatasetFiles,
    *,
    image_column: str | None = None,
    conditioning_image_column: str | None = None,
    caption_column: str | None = None,
    max_samples: int | None = None,
) -> ScanResult:
    """Check every row of one split of a dataset folder (stops after ``max_samples`` good rows)."""
    keys = _role_keys(files.form, image_column, conditioning_image_column, caption_column)
    locators = {role: _folder_image(files.base, keys[role][0]) for role in ("image", "conditioning_image")}
    base_rel = files.base.relative_to(files.root).as_posix() if files.base != files.root else ""
    result = ScanResult(source=str(files.rows_file))
    seen: dict[str, str] = {}
    with open(files.rows_file, "rb") as f:
        line_count = sum(1 for _ in f)
    for lineno, obj, problem in _progress(
        iter_jsonl(files.rows_file), line_count, f"checking {files.rows_file.name}"
    ):
        if max_samples is not None and len(result.good) >= max_samples:
            break
        result.total += 1
        where = f"{files.rows_file}:{lineno}"
        if obj is None:
            result.bad.append(BadRow(where, [("invalid JSON", problem)]))
            continue
        checked, problems = _check_record(obj, keys, locators, default_row_id=str)
        if checked is not None and base_rel:
            checked["row_id"] = posixpath.join(base_rel, checked["row_id"])
        _accumulate(result, lineno, where, checked, problems, obj, seen)
    return result


def _scan_loaded(
    dataset: datasets.Dataset, keys: dict[str, tuple[str, ...]], source: str, max_samples: int | None
) -> ScanResult:
    locators = {role: _stored_image(keys[role][0]) for role in ("image", "conditioning_image")}
    columns = [
        c
        for c in dict.fromkeys(
            [keys["image"][0], keys["conditioning_image"][0], keys["text"][0], "box", "texts", "row_id"]
        )
        if c in dataset.column_names
    ]
    # Read images as stored ({'bytes', 'path'}) so checking the rows decodes no pixels.
    view = dataset.select_columns(columns)
    for key in (keys["image"][0], keys["conditioning_image"][0]):
        if isinstance(view.features[key], datasets.Image):
            view = view.cast_column(key, datasets.Image(decode=False))
    result = ScanResult(source=source)
    seen: dict[str, str] = {}
    for index, obj in enumerate(_progress(view, len(view), f"checking {source}")):
        if max_samples is not None and len(result.good) >= max_samples:
            break
        result.total += 1

        def row_id(image_value, index=index, obj=obj):
            if obj.get("row_id"):
                return str(obj["row_id"])
            path = image_value.get("path") if isinstance(image_value, dict) else None
            return path or f"row-{index:08d}"

        checked, problems = _check_record(obj, keys, locators, default_row_id=row_id)
        if checked is not None and checked["row_id"] in seen and not obj.get("row_id"):
            checked["row_id"] = f"row-{index:08d}"  # stored paths are not always unique (e.g. bare file names)
        _accumulate(result, index, f"{source} row {index}", checked, problems, obj, seen)
    return result


def _problem_counts(bad: list[BadRow]) -> Counter:
    return Counter(kind for row in bad for kind in dict.fromkeys(kind for kind, _ in row.problems))


def _enforce(scan: ScanResult, on_bad_sample: str) -> None:
    """Raise on bad rows (``error``) or print what was dropped (``skip``); no usable row is always an error."""
    if scan.bad:
        listed = "\n".join(f"  {row.describe()}" for row in scan.bad[:MAX_LISTED_PROBLEMS])
        if len(scan.bad) > MAX_LISTED_PROBLEMS:
            listed += f"\n  ... and {len(scan.bad) - MAX_LISTED_PROBLEMS} more"
        kinds = ", ".join(f"{count} {kind}" for kind, count in _problem_counts(scan.bad).most_common())
        if on_bad_sample == "error":
            raise SkingenError(
                f"{scan.source}: {len(scan.bad)} bad row(s) of {scan.total} ({kinds}):\n{listed}\n"
                "fix them (`python dataset_tool.py validate DIR` lists every problem) "
                "or pass --on_bad_sample skip to drop them"
            )
        print(
            f"{scan.source}: skipped {len(scan.bad)} bad row(s) of {scan.total} ({kinds}); "
            f"kept {len(scan.good)}:\n{listed}",
            file=sys.stderr,
        )
    if not scan.good:
        raise SkingenError(f"{scan.source}: no usable rows; {LAYOUT_HELP}")


def _check_on_bad_sample(on_bad_sample: str) -> None:
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise SkingenError(f"--on_bad_sample must be one of {list(ON_BAD_SAMPLE)}, got {on_bad_sample!r}")


def _meta_columns(good: list[GoodRow]) -> dict[str, list]:
    return {
        "text": [row.text for row in good],
        "box": [row.box for row in good],
        "texts": [row.texts for row in good],
        "row_id": [row.row_id for row in good],
    }


# ---------------------------------------------------------------------------------------------------------------
# The loader


def load_skin_dataset(
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    *,
    image_column: str | None = None,
    conditioning_image_column: str | None = None,
    caption_column: str | None = None,
    on_bad_sample: str = "error",
    cache_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    split: str = "train",
    dataset_config_name: str | None = None,
) -> datasets.Dataset:
    """Load one split of a skin dataset with the normalised columns (see the module docstring).

    ``train_data_dir``: a folder with ``train.jsonl`` (and optionally ``validation.jsonl``) or an ImageFolder
    ``metadata.jsonl``; ``dataset_name``: a hub dataset, loaded with ``datasets.load_dataset``. Column flags
    override the default keys as in diffusers. ``on_bad_sample="skip"`` drops bad rows and prints what was dropped;
    ``max_samples`` keeps the first N good rows; ``dataset_config_name`` is the hub dataset's configuration.
    """
    _check_on_bad_sample(on_bad_sample)
    if max_samples is not None and max_samples < 1:
        raise SkingenError(f"--max_train_samples must be at least 1, got {max_samples}")
    if (train_data_dir is None) == (dataset_name is None):
        raise SkingenError(
            "give exactly one of --train_data_dir (a local dataset folder) or --dataset_name (a hub dataset)"
        )
    if dataset_name is not None:
        try:
            loaded = datasets.load_dataset(
                dataset_name,
                dataset_config_name,
                split=split,
                cache_dir=None if cache_dir is None else str(cache_dir),
            )
        except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
            raise SkingenError(
                f"--dataset_name {dataset_name}: could not load its {split!r} split ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); for a local folder use --train_data_dir"
            ) from None
        return normalize_dataset(
            loaded,
            image_column=image_column,
            conditioning_image_column=conditioning_image_column,
            caption_column=caption_column,
            on_bad_sample=on_bad_sample,
            max_samples=max_samples,
            source=f"{dataset_name} ({split})",
        )

    files = find_dataset_files(train_data_dir, split)
    scan = scan_folder(
        files,
        image_column=image_column,
        conditioning_image_column=conditioning_image_column,
        caption_column=caption_column,
        max_samples=max_samples,
    )
    _enforce(scan, on_bad_sample)
    columns = {
        "image": [row.image for row in scan.good],
        "conditioning_image": [row.conditioning_image for row in scan.good],
        **_meta_columns(scan.good),
    }
    return datasets.Dataset.from_dict(columns, features=row_features())


def normalize_dataset(
    dataset: datasets.Dataset,
    *,
    image_column: str | None = None,
    conditioning_image_column: str | None = None,
    caption_column: str | None = None,
    on_bad_sample: str = "error",
    max_samples: int | None = None,
    source: str = "dataset",
) -> datasets.Dataset:
    """Check and normalise an already-loaded ``datasets.Dataset`` (e.g. from the hub) to the loader's columns.

    Image columns may be ``Image`` features or path strings; ``box``/``texts``/``row_id`` columns are used when
    present. Images stay in the dataset's own storage and are decoded lazily.
    """
    _check_on_bad_sample(on_bad_sample)
    if isinstance(dataset, datasets.DatasetDict):
        raise SkingenError(
            f"{source}: got a DatasetDict with splits {list(dataset)}; pass one split (e.g. dataset['train'])"
        )
    keys = _role_keys("hub", image_column, conditioning_image_column, caption_column)
    absent = [(role, candidates[0]) for role, candidates in keys.items() if candidates[0] not in dataset.column_names]
    if absent:
        named = ", ".join(f"{name!r} ({FLAG_OF_ROLE[role]})" for role, name in absent)
        raise SkingenError(
            f"{source}: no column {named}; its columns are {dataset.column_names}; "
            "name the right ones with --image_column, --conditioning_image_column and --caption_column"
        )
    if keys["image"][0] == keys["conditioning_image"][0]:
        raise SkingenError(
            f"{source}: the image and conditioning image columns must differ, both are {keys['image'][0]!r}"
        )
    scan = _scan_loaded(dataset, keys, source, max_samples)
    _enforce(scan, on_bad_sample)

    image_key, cond_key = keys["image"][0], keys["conditioning_image"][0]
    kept = dataset.select_columns(list(dict.fromkeys([image_key, cond_key])))
    if len(scan.good) != len(dataset):
        kept = kept.select([row.index for row in scan.good]).flatten_indices()
    images = _rename_images(kept, image_key, cond_key)
    meta_features = datasets.Features(
        {k: v for k, v in row_features().items() if k in ("text", "box", "texts", "row_id")}
    )
    meta = datasets.Dataset.from_dict(_meta_columns(scan.good), features=meta_features)
    combined = datasets.concatenate_datasets([images, meta], axis=1)
    # Cast last: concatenation rebuilds features from the Arrow schema, which knows only plain Image.
    for key in ("image", "conditioning_image"):
        combined = combined.cast_column(key, RGBImage())
    return combined


def _rename_images(kept: datasets.Dataset, image_key: str, cond_key: str) -> datasets.Dataset:
    # Through temporary names, so swapped columns (image_column="conditioning_image") rename cleanly.
    kept = kept.rename_columns({image_key: "__skingen_image", cond_key: "__skingen_conditioning_image"})
    return kept.rename_columns({"__skingen_image": "image", "__skingen_conditioning_image": "conditioning_image"})


# ---------------------------------------------------------------------------------------------------------------
# Rows between preparation stages


def _rows_file(dataset_dir: str | os.PathLike, split: str, must_exist: bool = True) -> Path:
    if split not in SPLITS:
        raise SkingenError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    folder = Path(dataset_dir)
    if must_exist and not folder.is_dir():
        raise SkingenError(f"{folder}: dataset folder not found")
    return folder / f"{split}.jsonl"


def read_rows(dataset_dir: str | os.PathLike, split: str = "train") -> list[dict]:
    """All rows of ``<dataset_dir>/<split>.jsonl`` as dicts, every field kept (no completeness check)."""
    path = _rows_file(dataset_dir, split)
    if not path.is_file():
        raise SkingenError(
            f"{path}: not found; a prepared dataset folder holds {path.name} (merge_elements.py writes it)"
        )
    return [row for _, row in read_jsonl(path)]


def write_rows(dataset_dir: str | os.PathLike, rows: Iterable[dict], split: str = "train") -> Path:
    """Atomically write ``<dataset_dir>/<split>.jsonl`` (the folder is created when missing)."""
    rows = list(rows)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise TypeError(f"row {number} is a {type(row).__name__}, not a dict")
    return write_jsonl(_rows_file(dataset_dir, split, must_exist=False), rows)


# ---------------------------------------------------------------------------------------------------------------
# dataset_tool: validate, convert, split


def validate_dataset(
    dataset_dir: str | os.PathLike,
    *,
    split: str = "train",
    image_column: str | None = None,
    conditioning_image_column: str | None = None,
    caption_column: str | None = None,
) -> dict:
    """Check every row of one split and return a report (nothing is raised for bad rows)."""
    files = find_dataset_files(dataset_dir, split)
    scan = scan_folder(
        files,
        image_column=image_column,
        conditioning_image_column=conditioning_image_column,
        caption_column=caption_column,
    )
    return {
        "dataset": str(files.root),
        "form": files.form,
        "split": split,
        "file": str(files.rows_file),
        "rows": scan.total,
        "ok": len(scan.good),
        "bad": [{"where": row.where, "problems": [message for _, message in row.problems]} for row in scan.bad],
        "problem_counts": dict(_problem_counts(scan.bad).most_common()),
        "rows_with_boxes": sum(1 for row in scan.good if row.box),
        "boxes": sum(len(row.box) for row in scan.good),
        "image_sizes": dict(scan.image_sizes.most_common()),
        "conditioning_image_sizes": dict(scan.conditioning_sizes.most_common()),
        "size_mismatches": scan.size_mismatches,
    }


LINK_MODES = ("copy", "hardlink", "symlink")


def _place_file(src: Path, dst: Path, link: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link == "symlink":
        os.symlink(src.resolve(), dst)
        return
    if link == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: fall back to a copy
    shutil.copy2(src, dst)


def convert_dataset(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str,
    link: str = "copy",
    on_bad_sample: str = "error",
) -> dict:
    """Write the dataset ``src`` (every split) to the new folder ``dst`` in form ``to`` ("jsonl" or "imagefolder").

    Image files are copied (or hard/symbolic linked with ``link``); ``src`` is never modified. Extra row fields
    are kept. Rows are checked as the loader checks them; ``dst`` appears only when everything was written.
    """
    if to not in ("jsonl", "imagefolder"):
        raise SkingenError(f"--to must be 'jsonl' or 'imagefolder', got {to!r}")
    if link not in LINK_MODES:
        raise SkingenError(f"--link must be one of {list(LINK_MODES)}, got {link!r}")
    _check_on_bad_sample(on_bad_sample)
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    if dst_path.exists() and (not dst_path.is_dir() or any(dst_path.iterdir())):
        raise SkingenError(f"{dst_path}: already exists and is not empty; convert into a new folder")
    if dst_path == src_path or src_path in dst_path.parents:
        raise SkingenError(f"{dst_path}: must not be inside the source dataset {src_path}")
    splits = existing_splits(src_path)
    if not splits:
        find_dataset_files(src_path, "train")  # raises the layout error
    scans = {}
    for split in splits:
        files = find_dataset_files(src_path, split)
        scans[split] = (files, scan_folder(files))
        _enforce(scans[split][1], on_bad_sample)

    summary = {"dataset": str(dst_path), "form": to, "splits": {}}
    subfolders = to == "imagefolder" and len(splits) > 1
    with AtomicDirectory(dst_path) as tmp:
        for split, (files, scan) in scans.items():
            base = tmp / split if subfolders else tmp
            image_key = DEFAULT_COLUMNS[to]["image"]
            cond_key = DEFAULT_COLUMNS[to]["conditioning_image"]
            role_keys = _role_keys(files.form, None, None, None)
            base_rel = files.base.relative_to(files.root).as_posix() if files.base != files.root else ""
            rows = []
            for row in scan.good:
                # Without split subfolders, paths relative to the source root keep an ImageFolder's splits apart.
                new_image, new_cond = row.image_rel, row.conditioning_rel
                if not subfolders and base_rel:
                    new_image = posixpath.join(base_rel, new_image)
                    new_cond = posixpath.join(base_rel, new_cond)
                for rel, absolute in ((new_image, row.image), (new_cond, row.conditioning_image)):
                    target = base / rel
                    if not target.exists():  # a shared conditioning image (template.png) is placed once
                        _place_file(Path(absolute), target, link)
                # Same key order as the source row, with the image keys renamed for the target form.
                renamed = {
                    _first_present(row.raw, role_keys["image"]): (image_key, new_image),
                    _first_present(row.raw, role_keys["conditioning_image"]): (cond_key, new_cond),
                }
                out = dict(renamed[key] if key in renamed else (key, value) for key, value in row.raw.items())
                rows.append(out)
            rows_name = f"{split}.jsonl" if to == "jsonl" else "metadata.jsonl"
            write_jsonl(base / rows_name, rows)
            summary["splits"][split] = {"rows": len(rows), "skipped": len(scan.bad)}
    return summary


def validation_fraction_of(row_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by the row id and seed: a row's split never changes when rows are added."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_dataset(
    dataset_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    dst: str | os.PathLike | None = None,
) -> dict:
    """Split a ``train.jsonl`` dataset into ``train.jsonl`` + ``validation.jsonl`` by a hash of each row id.

    In place by default: both files are rewritten from all their rows together, so no row is lost and a rerun
    with another fraction re-splits cleanly (``val_fraction=0`` merges everything back). With ``dst`` the dataset
    is first copied there (see :func:`convert_dataset`) and ``dataset_dir`` is left untouched.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SkingenError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if dst is not None:
        convert_dataset(dataset_dir, dst, to="jsonl")
        dataset_dir = dst
    folder = Path(dataset_dir)
    files = find_dataset_files(folder, "train")
    if files.form != "jsonl" or files.rows_file != folder / "train.jsonl":
        raise SkingenError(
            f"{folder}: split works on the train.jsonl form; convert first "
            f"(python dataset_tool.py convert {folder} NEW_DIR --to jsonl)"
        )
    rows: dict[str, dict] = {}
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            continue
        for lineno, row in read_jsonl(path):
            image = row.get("image")
            if not isinstance(image, str) or not image:
                raise SkingenError(f"{path}:{lineno}: row has no 'image' path, which names the row; fix or remove it")
            rows.setdefault(posixpath.normpath(image.replace("\\", "/")), row)  # a row in both files counts once
    train = [row for row_id, row in rows.items() if validation_fraction_of(row_id, seed) >= val_fraction]
    validation = [row for row_id, row in rows.items() if validation_fraction_of(row_id, seed) < val_fraction]
    # Validation first: a crash between the two writes can only duplicate rows (deduplicated above), never lose one.
    if validation:
        write_rows(folder, validation, split="validation")
    write_rows(folder, train, split="train")
    if not validation:
        (folder / "validation.jsonl").unlink(missing_ok=True)
    return {
        "dataset": str(folder),
        "train": len(train),
        "validation": len(validation),
        "seed": seed,
        "val_fraction": val_fraction,
    }
