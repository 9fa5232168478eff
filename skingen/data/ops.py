"""Operations on a whole dataset folder for ``dataset_tool.py``: validate (every row checked, every image decoded),
convert (jsonl <-> ImageFolder) and split (deterministic train/validation)."""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
from pathlib import Path

from ..errors import SkingenError
from ..fileio import AtomicDirectory, write_jsonl
from .dataset import (
    DEFAULT_COLUMNS,
    SPLITS,
    ScanResult,
    check_on_bad_sample,
    enforce_bad_rows,
    existing_splits,
    find_dataset_files,
    problem_counts,
    role_keys,
    scan_folder,
    write_rows,
)
from .images import UnreadableImage, decode_fully
from .rows import IMAGE, BadRow, Problem, RowSpec, _first_present

# split needs only the image path, which names the row.
SPLIT_SPEC = RowSpec(frozenset({IMAGE}), frozenset({IMAGE}))


def validate_dataset(
    dataset_dir: str | os.PathLike,
    *,
    split: str = "train",
    image_column: str | None = None,
    conditioning_image_column: str | None = None,
    caption_column: str | None = None,
) -> dict:
    """Check every row of one split and decode every image it names; a report of all problems (bad rows are not
    raised). A split with no rows is an error."""
    files = find_dataset_files(dataset_dir, split)
    scan = scan_folder(
        files,
        image_column=image_column,
        conditioning_image_column=conditioning_image_column,
        caption_column=caption_column,
    )
    if not scan.total:
        raise SkingenError(f"{files.rows_file}: no rows (the file is empty); a dataset needs at least one row")
    _decode_images(scan)
    return {
        "dataset": str(files.root),
        "form": files.form,
        "split": split,
        "file": str(files.rows_file),
        "rows": scan.total,
        "ok": len(scan.good),
        "bad": [
            {"where": row.where, "problems": [problem.message for problem in row.problems]}
            for row in sorted(scan.bad, key=_line_of)
        ],
        "problem_counts": dict(problem_counts(scan.bad).most_common()),
        "rows_with_boxes": sum(1 for row in scan.good if row.box),
        "boxes": sum(len(row.box) for row in scan.good),
        "image_sizes": dict(scan.image_sizes.most_common()),
        "conditioning_image_sizes": dict(scan.conditioning_sizes.most_common()),
        "size_mismatches": scan.size_mismatches,
    }


def _line_of(row: BadRow) -> int:
    line = row.where.rsplit(":", 1)[-1]
    return int(line) if line.isdigit() else 0


def _decode_images(scan: ScanResult) -> None:
    """Decode every image of the good rows (each file once); rows with an image that does not decode turn bad."""
    from tqdm.auto import tqdm

    failures: dict[str, UnreadableImage | None] = {}
    still_good = []
    for row in tqdm(
        scan.good, desc="decoding images", unit="row", leave=False, disable=None if len(scan.good) > 200 else True
    ):
        problems = []
        for key, ref in (("image", row.image), ("conditioning_image", row.conditioning_image)):
            if ref is None:
                continue
            if ref.path not in failures:
                try:
                    decode_fully(ref.path)
                    failures[ref.path] = None
                except UnreadableImage as err:
                    failures[ref.path] = err
            err = failures[ref.path]
            if err is not None:
                problems.append(Problem(err.kind, f"{key!r} file {ref.rel!r} {err.reason}; replace it or drop the row"))
        if problems:
            scan.bad.append(BadRow(row.where, problems))
        else:
            still_good.append(row)
    scan.good = still_good


# No symlinks: rows may not point outside their dataset folder, links included (see skingen.data.rows).
LINK_MODES = ("copy", "hardlink")


def _place_file(src: Path, dst: Path, link: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
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
    check_on_bad_sample(on_bad_sample)
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
        enforce_bad_rows(scans[split][1], on_bad_sample)

    summary = {"dataset": str(dst_path), "form": to, "splits": {}}
    subfolders = to == "imagefolder" and len(splits) > 1
    with AtomicDirectory(dst_path) as tmp:
        for split, (files, scan) in scans.items():
            base = tmp / split if subfolders else tmp
            image_key = DEFAULT_COLUMNS[to]["image"]
            cond_key = DEFAULT_COLUMNS[to]["conditioning_image"]
            keys = role_keys(files.form, None, None, None)
            base_rel = files.base.relative_to(files.root).as_posix() if files.base != files.root else ""
            rows = []
            for row in scan.good:
                # Without split subfolders, paths relative to the source root keep an ImageFolder's splits apart.
                new_image, new_cond = row.image.rel, row.conditioning_image.rel
                if not subfolders and base_rel:
                    new_image = posixpath.join(base_rel, new_image)
                    new_cond = posixpath.join(base_rel, new_cond)
                for rel, absolute in ((new_image, row.image.path), (new_cond, row.conditioning_image.path)):
                    target = base / rel
                    if not target.exists():  # a shared conditioning image (template.png) is placed once
                        _place_file(Path(absolute), target, link)
                # Same key order as the source row, with the image keys renamed for the target form.
                renamed = {
                    _first_present(row.raw, keys["image"]): (image_key, new_image),
                    _first_present(row.raw, keys["conditioning_image"]): (cond_key, new_cond),
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
    total = 0
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            continue
        scan = scan_folder(find_dataset_files(folder, split), spec=SPLIT_SPEC)
        total += scan.total
        if scan.bad:
            enforce_bad_rows(scan, "error", fix="fix or remove those rows, then split again")
        for row in scan.good:
            rows.setdefault(row.row_id, row.raw)  # a row in both files counts once
    if not total:
        raise SkingenError(f"{folder / 'train.jsonl'}: no rows (the file is empty); nothing to split")
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
