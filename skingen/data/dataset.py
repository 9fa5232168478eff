"""The one dataset loader: our ``train.jsonl`` folder, Hugging Face ImageFolder ``metadata.jsonl``, or a hub dataset.

Every form comes out with the same columns (see docs/architecture.md, "Dataset rows"):
``image`` and ``conditioning_image`` (Image features, decoded lazily to RGB), ``text``, ``box``
(4-point quads in the original image's pixels), ``texts`` (aligned with ``box``) and ``row_id``.
Each row is checked by :func:`skingen.data.rows.check_row` up front, so a bad row is reported with its file and
line before training starts. Preparation stages read the rows they rewrite with :func:`read_checked_rows`
(the same check, with the fields the stage needs) and write them back with :func:`write_rows`.
Training reads the checked rows themselves (:mod:`skingen.data.training_rows`, from the same scans); image opening
lives in :mod:`skingen.data.images` and :mod:`skingen.data.decoding`, validate/convert/split in :mod:`skingen.data.ops`.
"""

from __future__ import annotations

import os
import posixpath
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from ..errors import SkingenError
from ..fileio import iter_jsonl, read_jsonl, write_jsonl
from .decoding import DECODE_FIX, ImageDecodeError, RGBImage, decoded_row  # noqa: F401  (re-exported)
from .images import IMAGE_READ_ERRORS, open_rgb, to_rgb  # noqa: F401  (open_rgb/to_rgb: re-exported for older imports)
from .rows import TRAINING, BadRow, FolderImages, ImageRef, Problem, Row, RowSpec, StoredImages, check_row

SPLITS = ("train", "validation")
ON_BAD_SAMPLE = ("error", "skip")
MAX_LISTED_PROBLEMS = 10
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


def row_features() -> datasets.Features:
    return datasets.Features(
        {
            "image": RGBImage(),
            "conditioning_image": RGBImage(),
            "text": datasets.Value("string"),
            "box": datasets.List(datasets.List(datasets.List(datasets.Value("float32")))),
            "texts": datasets.List(datasets.Value("string")),
            "row_id": datasets.Value("string"),
            "where": datasets.Value("string"),  # file:line of the row (hub rows: "<dataset> row N")
        }
    )


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
    confined: bool = True  # image paths must stay inside ``base`` (False: a rows file the user named, as diffusers)


def find_dataset_files(dataset_dir: str | os.PathLike, split: str = "train") -> DatasetFiles:
    """Decide which form a dataset folder is in (our ``<split>.jsonl`` wins over ImageFolder ``metadata.jsonl``)."""
    if split not in SPLITS:
        raise SkingenError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    path = Path(dataset_dir).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        # A rows file named on the command line is the user's own: read it as diffusers does (absolute paths, or
        # relative to the file's folder); rows found inside a dataset folder keep the folder rules.
        if split != "train":
            raise SkingenError(f"{path}: a rows file holds one split, so split {split!r} cannot be read from it; "
                               f"put {split}.jsonl beside train.jsonl in a dataset folder and pass the folder")
        form = "imagefolder" if path.name == "metadata.jsonl" else "jsonl"
        return DatasetFiles(root=path.parent, form=form, split=split, rows_file=path, base=path.parent, confined=False)
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
# Checking every row of a split


@dataclass
class ScanResult:
    source: str
    total: int = 0
    good: list[Row] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    image_sizes: Counter = field(default_factory=Counter)
    conditioning_sizes: Counter = field(default_factory=Counter)
    size_mismatches: int = 0

    def add(self, row: Row, seen: dict[str, str]) -> None:
        """A checked row; a second row with the same id (the same image) is a bad row."""
        if row.row_id in seen:
            self.bad.append(
                BadRow(
                    row.where,
                    [
                        Problem(
                            "duplicate row",
                            f"image {row.row_id!r} is already used by {seen[row.row_id]}; each row needs its own image",
                        )
                    ],
                )
            )
            return
        seen[row.row_id] = row.where
        self.good.append(row)
        if row.image is not None:
            self.image_sizes["{}x{}".format(*row.image.size)] += 1
        if row.conditioning_image is not None:
            self.conditioning_sizes["{}x{}".format(*row.conditioning_image.size)] += 1
        if (
            row.image is not None
            and row.conditioning_image is not None
            and row.image.size != row.conditioning_image.size
        ):
            self.size_mismatches += 1


def role_keys(form: str, image_column, conditioning_image_column, caption_column) -> dict[str, tuple[str, ...]]:
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
    spec: RowSpec = TRAINING,
    extra_conditioning_keys: tuple[str | tuple[str, ...], ...] = (),
) -> ScanResult:
    """Check every row of one split of a dataset folder for a stage (``spec``; stops after ``max_samples`` good
    rows). A row without an image path (where the stage allows it) is named ``<file stem>_<line>``."""
    keys = role_keys(files.form, image_column, conditioning_image_column, caption_column)
    images = FolderImages(files.base, confined=files.confined)
    base_rel = files.base.relative_to(files.root).as_posix() if files.base != files.root else ""
    result = ScanResult(source=str(files.rows_file))
    seen: dict[str, str] = {}
    with open(files.rows_file, "rb") as f:
        line_count = sum(1 for _ in f)
    for lineno, obj, problem in _progress(iter_jsonl(files.rows_file), line_count, f"checking {files.rows_file.name}"):
        if max_samples is not None and len(result.good) >= max_samples:
            break
        result.total += 1
        where = f"{files.rows_file}:{lineno}"
        if obj is None:
            result.bad.append(BadRow(where, [Problem("invalid JSON", problem)]))
            continue
        try:
            row = check_row(
                obj,
                files.base,
                where,
                spec=spec,
                keys=keys,
                images=images,
                extra_conditioning_keys=extra_conditioning_keys,
                default_row_id=lambda _, lineno=lineno: f"{files.rows_file.stem}_{lineno:05d}",
            )
        except BadRow as bad:
            result.bad.append(bad)
            continue
        if base_rel and row.image is not None:
            row.row_id = posixpath.join(base_rel, row.row_id)
        result.add(row, seen)
    return result


def _scan_loaded(
    dataset: datasets.Dataset,
    keys: dict[str, tuple[str, ...]],
    source: str,
    max_samples: int | None,
    extra_conditioning_keys: tuple[str, ...] = (),
) -> tuple[ScanResult, list[int]]:
    """Check the rows of a loaded dataset; also returns the indices of the good rows. The good rows' images keep
    their stored path only: their pixels stay in the dataset (read by row number), not in the rows."""
    image_keys = list(dict.fromkeys([keys["image"][0], keys["conditioning_image"][0], *extra_conditioning_keys]))
    columns = [
        c
        for c in dict.fromkeys([*image_keys, keys["text"][0], "box", "texts", "row_id"])
        if c in dataset.column_names
    ]
    # Read images as stored ({'bytes', 'path'}) so checking the rows decodes no pixels.
    view = dataset.select_columns(columns)
    for key in image_keys:
        if isinstance(view.features[key], datasets.Image):
            view = view.cast_column(key, datasets.Image(decode=False))
    result = ScanResult(source=source)
    good_indices: list[int] = []
    seen: dict[str, str] = {}
    images = StoredImages()
    for index, obj in enumerate(_progress(view, len(view), f"checking {source}")):
        if max_samples is not None and len(result.good) >= max_samples:
            break
        result.total += 1

        def row_id(image, index=index):
            path = image.path.get("path") if image is not None and isinstance(image.path, dict) else None
            return path or f"row-{index:08d}"

        try:
            row = check_row(obj, None, f"{source} row {index}", keys=keys, images=images, default_row_id=row_id,
                            extra_conditioning_keys=extra_conditioning_keys)
        except BadRow as bad:
            result.bad.append(bad)
            continue
        if row.row_id in seen and not obj.get("row_id"):
            row.row_id = f"row-{index:08d}"  # stored paths are not always unique (e.g. bare file names)
        row.image = _without_bytes(row.image)
        row.conditioning_images = tuple(_without_bytes(ref) for ref in row.conditioning_images)
        before = len(result.good)
        result.add(row, seen)
        if len(result.good) > before:
            good_indices.append(index)
    return result, good_indices


def _without_bytes(ref: ImageRef | None) -> ImageRef | None:
    if ref is None or not isinstance(ref.path, dict):
        return ref
    return ImageRef({"path": ref.path.get("path"), "bytes": None}, ref.rel, ref.size)


def problem_counts(bad: list[BadRow]) -> Counter:
    """How many rows have each kind of problem."""
    return Counter(kind for row in bad for kind in dict.fromkeys(problem.kind for problem in row.problems))


def enforce_bad_rows(scan: ScanResult, on_bad_sample: str, fix: str = "") -> None:
    """Raise on bad rows (``error``) or print what was dropped (``skip``); no usable row is always an error."""
    if scan.bad:
        listed = "\n".join(row.describe(indent="  ") for row in scan.bad[:MAX_LISTED_PROBLEMS])
        if len(scan.bad) > MAX_LISTED_PROBLEMS:
            listed += f"\n  ... and {len(scan.bad) - MAX_LISTED_PROBLEMS} more"
        kinds = ", ".join(f"{count} {kind}" for kind, count in problem_counts(scan.bad).most_common())
        if on_bad_sample == "error":
            raise SkingenError(
                f"{scan.source}: {len(scan.bad)} bad row(s) of {scan.total} ({kinds}):\n{listed}\n"
                + (
                    fix
                    or "fix them (`python dataset_tool.py validate DIR` lists every problem) "
                    "or pass --on_bad_sample skip to drop them"
                )
            )
        print(
            f"{scan.source}: skipped {len(scan.bad)} bad row(s) of {scan.total} ({kinds}); "
            f"kept {len(scan.good)}:\n{listed}",
            file=sys.stderr,
        )
    if not scan.good:
        if not scan.total:
            raise SkingenError(f"{scan.source}: no rows (the file is empty); every stage needs at least one row")
        raise SkingenError(f"{scan.source}: no usable rows; {LAYOUT_HELP}")


def enforce_rows(scan: ScanResult, fix: str) -> None:
    """A stage that needs every row: any bad row (listed by file:line, with ``fix``) or no row at all stops it."""
    enforce_bad_rows(scan, "error", fix=fix)


def check_on_bad_sample(on_bad_sample: str) -> None:
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise SkingenError(f"--on_bad_sample must be one of {list(ON_BAD_SAMPLE)}, got {on_bad_sample!r}")


def _meta_columns(good: list[Row]) -> dict[str, list]:
    return {
        "text": [row.text for row in good],
        "box": [row.box for row in good],
        "texts": [row.texts for row in good],
        "row_id": [row.row_id for row in good],
        "where": [row.where for row in good],
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
    check_loader_flags(train_data_dir, dataset_name, on_bad_sample, max_samples)
    if dataset_name is not None:
        return normalize_dataset(
            load_hub_split(dataset_name, dataset_config_name, split, cache_dir),
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
    enforce_bad_rows(scan, on_bad_sample)
    return rows_dataset(scan.good)


def check_loader_flags(train_data_dir, dataset_name, on_bad_sample: str, max_samples: int | None) -> None:
    check_on_bad_sample(on_bad_sample)
    if max_samples is not None and max_samples < 1:
        raise SkingenError(f"--max_train_samples must be at least 1, got {max_samples}")
    if (train_data_dir is None) == (dataset_name is None):
        raise SkingenError(
            "give exactly one of --train_data_dir (a local dataset folder) or --dataset_name (a hub dataset)"
        )


def load_hub_split(
    dataset_name: str, dataset_config_name: str | None, split: str, cache_dir: str | os.PathLike | None
) -> datasets.Dataset:
    """One split of a hub dataset (``datasets.load_dataset``), or an error saying why it could not be loaded."""
    try:
        return datasets.load_dataset(
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


def rows_dataset(rows: list[Row]) -> datasets.Dataset:
    """Checked rows of a dataset folder as a ``datasets.Dataset`` with the loader's columns (images by path)."""
    columns = {
        "image": [row.image.path for row in rows],
        "conditioning_image": [row.conditioning_image.path for row in rows],
        **_meta_columns(rows),
    }
    return datasets.Dataset.from_dict(columns, features=row_features())


def normalize_dataset(dataset: datasets.Dataset, **options) -> datasets.Dataset:
    """Check and normalise an already-loaded ``datasets.Dataset`` (e.g. from the hub) to the loader's columns.

    Image columns may be ``Image`` features or path strings; ``box``/``texts``/``row_id`` columns are used when
    present. Images stay in the dataset's own storage and are decoded lazily. ``options`` are those of
    :func:`normalized_rows` (the column flags, ``on_bad_sample``, ``max_samples``, ``source`` and
    ``extra_conditioning_columns``, which become ``conditioning_image_1``, ``conditioning_image_2``, ...).
    """
    return normalized_rows(dataset, **options)[0]


def normalized_rows(
    dataset: datasets.Dataset,
    *,
    image_column: str | None = None,
    conditioning_image_column: str | None = None,
    caption_column: str | None = None,
    on_bad_sample: str = "error",
    max_samples: int | None = None,
    source: str = "dataset",
    extra_conditioning_columns: tuple[str, ...] = (),
) -> tuple[datasets.Dataset, list[Row]]:
    """:func:`normalize_dataset`, with the checked rows (row ``i`` is row ``i`` of the returned dataset)."""
    check_on_bad_sample(on_bad_sample)
    if isinstance(dataset, datasets.DatasetDict):
        raise SkingenError(
            f"{source}: got a DatasetDict with splits {list(dataset)}; pass one split (e.g. dataset['train'])"
        )
    keys = role_keys("hub", image_column, conditioning_image_column, caption_column)
    named = [(role, candidates[0]) for role, candidates in keys.items()]
    named += [("conditioning_image", column) for column in extra_conditioning_columns]
    absent = [(role, name) for role, name in named if name not in dataset.column_names]
    if absent:
        listed = ", ".join(f"{name!r} ({FLAG_OF_ROLE[role]})" for role, name in absent)
        raise SkingenError(
            f"{source}: no column {listed}; its columns are {dataset.column_names}; "
            "name the right ones with --image_column, --conditioning_image_column and --caption_column"
        )
    image_keys = [keys["image"][0], keys["conditioning_image"][0], *extra_conditioning_columns]
    if len(set(image_keys)) != len(image_keys):
        raise SkingenError(
            f"{source}: the image and conditioning image columns must differ, they are {image_keys}"
            if len(image_keys) > 2
            else f"{source}: the image and conditioning image columns must differ, both are {keys['image'][0]!r}"
        )
    scan, good_indices = _scan_loaded(dataset, keys, source, max_samples, tuple(extra_conditioning_columns))
    enforce_bad_rows(scan, on_bad_sample)

    kept = dataset.select_columns(image_keys)
    if len(scan.good) != len(dataset):
        kept = kept.select(good_indices).flatten_indices()
    names = ["image", "conditioning_image", *(f"conditioning_image_{n}" for n in range(1, len(image_keys) - 1))]
    # Through temporary names, so swapped columns (image_column="conditioning_image") rename cleanly.
    kept = kept.rename_columns({key: f"__skingen_{name}" for key, name in zip(image_keys, names)})
    images = kept.rename_columns({f"__skingen_{name}": name for name in names})
    meta_features = datasets.Features(
        {k: v for k, v in row_features().items() if k in ("text", "box", "texts", "row_id", "where")}
    )
    meta = datasets.Dataset.from_dict(_meta_columns(scan.good), features=meta_features)
    combined = datasets.concatenate_datasets([images, meta], axis=1)
    # Cast last: concatenation rebuilds features from the Arrow schema, which knows only plain Image.
    for name in names:
        combined = combined.cast_column(name, RGBImage())
    return combined, scan.good


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
    """All rows of ``<dataset_dir>/<split>.jsonl`` as raw dicts, every field kept (JSON checked, fields not).

    Stages that use the rows' fields read them with :func:`read_checked_rows` instead."""
    path = _rows_file(dataset_dir, split)
    if not path.is_file():
        raise SkingenError(
            f"{path}: not found; a prepared dataset folder holds {path.name} (merge_elements.py writes it)"
        )
    return [row for _, row in read_jsonl(path)]


def read_checked_rows(dataset_dir: str | os.PathLike, spec: RowSpec, split: str = "train") -> list[Row]:
    """Every row of ``<dataset_dir>/<split>.jsonl`` checked for a preparation stage (``spec``: the fields it needs).

    Any bad row stops the stage with every problem listed by ``file:line``; a file with no rows is an error too.
    The rows' ``raw`` dicts are what the stage updates and writes back with :func:`write_rows`.
    """
    path = _rows_file(dataset_dir, split)
    if not path.is_file():
        raise SkingenError(
            f"{path}: not found; a prepared dataset folder holds {path.name} (merge_elements.py writes it)"
        )
    files = DatasetFiles(root=Path(dataset_dir), form="jsonl", split=split, rows_file=path, base=Path(dataset_dir))
    scan = scan_folder(files, spec=spec)
    enforce_bad_rows(scan, "error", fix="fix or remove those rows")
    return scan.good


def write_rows(dataset_dir: str | os.PathLike, rows: Iterable[dict], split: str = "train") -> Path:
    """Atomically write ``<dataset_dir>/<split>.jsonl`` (the folder is created when missing)."""
    rows = list(rows)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise TypeError(f"row {number} is a {type(row).__name__}, not a dict")
    return write_jsonl(_rows_file(dataset_dir, split, must_exist=False), rows)
