"""Stage 1: skin packages -> one atlas image each (placed by a layout spec) + train.jsonl rows.

Each sub-folder or .zip of --packages_dir is a package; its element images are found by the
layout's file-name patterns, fitted to their boxes and composited in z-order. Finished
packages are skipped on a rerun; every output is written atomically.

    python merge_elements.py --packages_dir skins/ --layout key_elements --resolution 512 \\
        --output_dir datasets/keyboard_512 --num_workers 8 --skip_incomplete

--split cuts atlases (e.g. generated skins) back into package folders a skin designer imports:

    python merge_elements.py --split --input outputs/generated/ --layout key_elements --output_dir outputs/packages
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from skingen.config import parse_args_with_config
from skingen.data import read_rows, write_rows
from skingen.errors import SkingenError, run_cli
from skingen.fileio import atomic_save_image, atomic_write_json
from skingen.layout import LAYOUT_RECORD, Layout, load_layout, merge_package, split_atlas
from skingen.skins import check_unique_names, find_elements, list_packages, open_package, package_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ROWS_FILE = "train.jsonl"
FLUSH_EVERY = 50  # rows are saved after this many packages (or FLUSH_SECONDS), so a killed run keeps what it finished
FLUSH_SECONDS = 30.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages_dir", default=None, help="folder whose sub-folders and .zip files are skin packages")
    parser.add_argument("--package", nargs="+", default=None, help="one or more package folders / .zip files")
    parser.add_argument("--layout", default="key_elements", help="a name in configs/layouts/ or a path to a .yaml spec")
    parser.add_argument("--resolution", type=int, default=None, help="canvas width, e.g. 512 or 1024 (default: the layout's first)")
    parser.add_argument("--output_dir", required=True, help="dataset folder (merge) or folder of package folders (--split)")
    parser.add_argument("--num_workers", type=int, default=1, help="worker processes for merging")
    parser.add_argument("--skip_incomplete", action="store_true", help="skip unusable packages (missing elements, unreadable files) with a report instead of stopping")
    parser.add_argument("--verbose", action="store_true", help="list each package's files that no layout element uses")
    parser.add_argument("--split", action="store_true", help="cut atlas images back into package folders")
    parser.add_argument("--input", default=None, help="with --split: an atlas image or a folder of them")
    args = parse_args_with_config(parser, argv)
    if args.split:
        if args.input is None:
            parser.error("--split needs --input IMAGE_OR_DIR")
        if args.packages_dir or args.package:
            parser.error("--split reads atlases from --input; --packages_dir/--package are for merging")
    else:
        if bool(args.packages_dir) == bool(args.package):
            parser.error("give either --packages_dir DIR or --package PATH [PATH ...]")
        if args.input is not None:
            parser.error("--input is for --split; merge reads --packages_dir or --package")
    if args.num_workers < 1:
        parser.error("--num_workers must be at least 1")
    return args


def remove_stale_temp_files(dataset_dir: Path) -> None:
    """Temp files a killed run left beside its outputs (finished outputs are never partial)."""
    for folder in (dataset_dir, dataset_dir / "images"):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def check_layout_file(dataset_dir: Path, layout: Layout) -> None:
    """A dataset holds one layout at one size (the template is shared); refuse to mix."""
    path = dataset_dir / LAYOUT_RECORD
    if path.is_file():
        recorded = load_layout(path)
        if replace(recorded, path=layout.path) != layout:
            raise SkingenError(
                f"{path}: this dataset was merged with layout '{recorded.name}' at {recorded.width}x{recorded.height}, "
                f"which differs from '{layout.name}' at {layout.width}x{layout.height} ({layout.path}); "
                "use another --output_dir (one layout and resolution per dataset)"
            )
    atomic_write_json(path, layout.to_dict())


def merge_one(job: tuple[str, Layout, str, bool]) -> dict:
    """Merge one package and save its atlas; runs in a worker process."""
    package_path, layout, images_dir, skip_incomplete = job
    name = package_name(package_path)
    try:
        with open_package(package_path) as package:
            unused = find_elements(package, layout).extras
            image, placements = merge_package(package, layout)
    except SkingenError as err:
        if skip_incomplete:
            return {"package": name, "skipped": str(err)}
        raise
    atomic_save_image(image, Path(images_dir) / f"{name}.png")
    return {"package": name, "placements": placements, "unused": unused}


def merge_packages(args: argparse.Namespace, layout: Layout) -> None:
    paths = list_packages(args.packages_dir) if args.packages_dir else [Path(p) for p in args.package]
    check_unique_names(paths)
    dataset_dir = Path(args.output_dir)
    images_dir = dataset_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(dataset_dir)
    check_layout_file(dataset_dir, layout)

    rows = read_rows(dataset_dir) if (dataset_dir / ROWS_FILE).is_file() else []
    done = {row.get("package") for row in rows if (dataset_dir / str(row.get("image", ""))).is_file()}
    todo = [p for p in paths if package_name(p) not in done]
    order = {package_name(p): i for i, p in enumerate(paths)}
    merged: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    unused: dict[str, list[str]] = {}

    def save_rows() -> None:
        # Rows of other packages and fields other stages own are kept; new packages go last, in input order.
        for row in rows:
            if row.get("package") in merged:
                row.update(merged.pop(row["package"]))
                row.setdefault("text", "")
        rows.extend({**merged[name], "text": ""} for name in sorted(merged, key=order.get))
        merged.clear()
        write_rows(dataset_dir, rows)

    print(f"{len(paths)} packages: {len(paths) - len(todo)} already merged, {len(todo)} to merge with layout "
          f"'{layout.name}' at {layout.width}x{layout.height}")
    jobs = [(str(p), layout, str(images_dir), args.skip_incomplete) for p in todo]
    pool = multiprocessing.Pool(args.num_workers) if args.num_workers > 1 and len(jobs) > 1 else None
    results = pool.imap_unordered(merge_one, jobs) if pool else map(merge_one, jobs)
    last_save = time.monotonic()
    try:
        for count, result in enumerate(tqdm(results, total=len(jobs), desc="merge", unit="skin"), start=1):
            name = result["package"]
            if "skipped" in result:
                skipped[name] = result["skipped"]
            else:
                merged[name] = {"image": f"images/{name}.png", "package": name, "layout": layout.name,
                                "elements": result["placements"]}
                unused[name] = result["unused"]
            if count % FLUSH_EVERY == 0 or time.monotonic() - last_save > FLUSH_SECONDS:
                save_rows()
                last_save = time.monotonic()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        save_rows()

    atomic_write_json(dataset_dir / "merge_report.json", {
        "layout": layout.name, "resolution": layout.resolution, "merged": len(todo) - len(skipped),
        "already_merged": len(paths) - len(todo), "skipped": skipped, "unused_files": unused,
    })
    if args.verbose:
        for name, files in unused.items():
            if files:
                print(f"{name}: files no element of '{layout.name}' uses: {', '.join(files)}")
    print(f"merged {len(todo) - len(skipped)}, already merged {len(paths) - len(todo)}, skipped {len(skipped)}; "
          f"rows in {dataset_dir / ROWS_FILE}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")


def split_atlases(args: argparse.Namespace) -> None:
    source = Path(args.input)
    if source.is_dir():
        inputs = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif source.is_file():
        inputs = [source]
    else:
        raise SkingenError(f"--input {source}: no such file or folder")
    if not inputs:
        raise SkingenError(f"--input {source}: no images ({', '.join(IMAGE_SUFFIXES)}) inside")
    default_layout = load_layout(args.layout, args.resolution)
    output_dir = Path(args.output_dir)
    written = 0
    for path in tqdm(inputs, desc="split", unit="atlas"):
        target = output_dir / path.stem
        if target.is_dir():
            continue  # written atomically by an earlier run: complete
        layout = default_layout
        if args.resolution is None:
            try:
                with Image.open(path) as image:
                    width = image.width
            except (OSError, SyntaxError, ValueError) as err:
                raise SkingenError(f"{path}: not a readable image ({err})") from None
            if width in default_layout.resolutions and width != default_layout.resolution:
                layout = load_layout(args.layout, width)
        split_atlas(path, layout, target)
        written += 1
    print(f"split {written} atlases into {output_dir} ({len(inputs) - written} already there)")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.split:
        split_atlases(args)
    else:
        merge_packages(args, load_layout(args.layout, args.resolution))


if __name__ == "__main__":
    run_cli(main)
