"""Stage 1: skin packages -> one atlas image each (placed by a layout spec) + train.jsonl rows.

Each sub-folder or .zip of --packages_dir is a package; its element images are found by the
package's skin.yaml, else the --element_map, else the layout's file-name patterns (see
skingen/skins/element_maps.py), fitted to their boxes and alpha-composited in z-order. Finished
packages are skipped on a rerun; rows are saved every couple of seconds and every output is
written atomically, so a killed run redoes only the last few packages.

    python merge_elements.py --packages_dir skins/ --layout key_elements --resolution 512 \\
        --element_map android --output_dir datasets/keyboard_512 --num_workers 8 --skip_incomplete

A Baidu IME skin (``.bds``, zipped or unzipped) merges like any package (``--element_map baidu`` finds its styles),
or draws its own keyboard with exact key boxes and strings (``--layout package --keyboard py_9 --orientation port``);
``--split --format bds`` writes a keyboard image back as a .bds (docs/bds.md).

--split cuts atlases (e.g. generated skins) back into package folders a skin designer imports, with a
skin.yaml that this script reads back; --dataset_dir gives each atlas its package's file names, native
sizes, 9-patch markers and alpha (from the merge record of the row with the same package name):

    python merge_elements.py --split --input outputs/generated/ --layout key_elements --output_dir outputs/packages
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from skingen.config import parse_args_with_config
from skingen.data.dataset import read_rows, write_rows
from skingen.errors import SkingenError, run_cli
from skingen.fileio import atomic_save_image, atomic_write_json, remove_stale_temp_files
from skingen.skins.atlas import compose_package, split_atlas
from skingen.skins.bds.dataset import PACKAGE_LAYOUT, render_package_row
from skingen.skins.bds.views import open_any_package
from skingen.skins.bds.writer import split_to_bds
from skingen.skins.element_maps import ElementMap, check_map_against_layout, load_element_map
from skingen.skins.layout import LAYOUT_RECORD, Layout, load_layout
from skingen.skins.package import check_unique_names, list_packages, package_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ROWS_FILE = "train.jsonl"
MASKS_DIR = "masks"  # per package, each element's alpha in its box: what --split gives back as the tiles' alpha
SHOWN_WARNINGS = 3  # package warnings printed as they come (all with --verbose); the rest are counted
FLUSH_SECONDS = 2.0  # rows are saved at least this often, so a killed run redoes only the last few packages


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages_dir", default=None, help="folder whose sub-folders and .zip files are skin packages")
    parser.add_argument("--package", nargs="+", default=None, help="one or more package folders / .zip files")
    parser.add_argument("--layout", default="key_elements", help="a name in configs/layouts/ or a path to a .yaml spec; 'package': each Baidu package's own --keyboard")
    parser.add_argument("--keyboard", default=None, help="with --layout package: the keyboard file of the package to draw (py_26, py_9, en_26, symbol, ...; default py_26)")
    parser.add_argument("--orientation", default=None, choices=("port", "land"), help="with --layout package: portrait or landscape keyboards (default port)")
    parser.add_argument("--format", default="folder", choices=("folder", "bds"), help="with --split: package folders with skin.yaml, or Baidu .bds files")
    parser.add_argument("--element_map", default=None, help="which files make each element (background, icon, label): a name in configs/element_maps/ (e.g. android) or a path to a .yaml map; a package's skin.yaml wins over it")
    parser.add_argument("--resolution", type=int, default=None, help="canvas width, e.g. 512 or 1024 (default: the layout's first)")
    parser.add_argument("--output_dir", required=True, help="dataset folder (merge) or folder of package folders (--split)")
    parser.add_argument("--num_workers", type=int, default=1, help="worker processes for merging")
    parser.add_argument("--skip_incomplete", action="store_true", help="skip unusable packages (missing elements, unreadable files) with a report instead of stopping")
    parser.add_argument("--verbose", action="store_true", help="print, per package, the file chosen for each layer (and why, ties marked) and the files no element uses")
    parser.add_argument("--split", action="store_true", help="cut atlas images back into package folders")
    parser.add_argument("--input", default=None, help="with --split: an atlas image or a folder of them")
    parser.add_argument("--dataset_dir", default=None, help="with --split: the merged dataset whose rows (by package name = atlas file name) give file names, native sizes and alpha")
    args = parse_args_with_config(parser, argv)
    if args.split:
        if args.input is None:
            parser.error("--split needs --input IMAGE_OR_DIR")
        if args.packages_dir or args.package:
            parser.error("--split reads atlases from --input; --packages_dir/--package are for merging")
    else:
        if bool(args.packages_dir) == bool(args.package):
            parser.error("give either --packages_dir DIR or --package PATH [PATH ...]")
        if args.input is not None or args.dataset_dir is not None:
            parser.error("--input and --dataset_dir are for --split; merge reads --packages_dir or --package")
    if args.layout == PACKAGE_LAYOUT:
        if args.split or args.element_map:
            parser.error("--layout package draws Baidu packages' own keyboards; --split and --element_map are for atlas layouts")
        args.keyboard, args.orientation = args.keyboard or "py_26", args.orientation or "port"
    elif args.keyboard or args.orientation:
        parser.error("--keyboard and --orientation choose a Baidu package's own keyboard: use them with --layout package")
    if args.format != "folder" and not args.split:
        parser.error("--format chooses what --split writes; merging reads every package form by itself")
    if args.num_workers < 1:
        parser.error("--num_workers must be at least 1")
    return args


def remove_leftovers(folder: Path, subfolders: Sequence[str] = ("images", MASKS_DIR)) -> None:
    """Temp files and half-built package folders a killed run left beside its outputs (finished outputs are
    never partial, so everything else stays)."""
    for place in (folder, *(folder / sub for sub in subfolders)):
        remove_stale_temp_files(place)
        if place.is_dir():
            for tmp in place.glob(".*"):
                if tmp.is_dir() and not tmp.is_symlink():  # AtomicDirectory's build folders and moved-aside versions
                    shutil.rmtree(tmp, ignore_errors=True)


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


def merge_one(job: tuple[str, Layout, ElementMap | None, str, bool]) -> dict:
    """Merge one package and save its atlas and alpha; runs in a worker process."""
    package_path, layout, element_map, dataset_dir, skip_incomplete = job
    name = package_name(package_path)
    try:
        with open_any_package(package_path) as package:
            if not package.files:
                raise SkingenError(f"{package.path}: the package is empty; put its element images in it or remove it")
            composition = compose_package(package, layout, element_map)
    except SkingenError as err:
        if skip_incomplete:
            return {"package": name, "skipped": str(err)}
        raise
    atomic_save_image(composition.alpha, Path(dataset_dir) / MASKS_DIR / f"{name}.png")
    atomic_save_image(composition.image, Path(dataset_dir) / "images" / f"{name}.png")
    warning = "; ".join(filter(None, [composition.warning, *getattr(package, "warnings", [])])) or None  # a .bds's missing parts
    source = {"source_package": str(Path(package_path).resolve())} if hasattr(package, "views") else {}  # a .bds
    return {"package": name, "placements": composition.placements, "unused": composition.unused, **source,
            "warning": warning, "choices": composition.choices}  # fmt: skip


class RowSaver:
    """Rows of finished packages, saved to train.jsonl at least every FLUSH_SECONDS (atomically). Rows of other
    packages and fields other stages own are kept; new packages go last, in input order."""

    def __init__(self, dataset_dir: Path, rows: list[dict], order: dict[str, int]):
        self.dataset_dir, self.rows, self.order = dataset_dir, rows, order
        self.pending: dict[str, dict] = {}
        self.last_save = time.monotonic()

    def add(self, name: str, row: dict) -> None:
        self.pending[name] = row
        if time.monotonic() - self.last_save >= FLUSH_SECONDS:
            self.save()

    def save(self) -> None:
        if self.pending or not (self.dataset_dir / ROWS_FILE).is_file():
            for row in self.rows:
                if row.get("package") in self.pending:
                    row.update(self.pending.pop(row["package"]))
                    row.setdefault("text", "")
            self.rows.extend({**self.pending[n], "text": ""} for n in sorted(self.pending, key=self.order.get))
            self.pending.clear()
            write_rows(self.dataset_dir, self.rows)
        self.last_save = time.monotonic()


def merge_packages(args: argparse.Namespace, layout: Layout, element_map: ElementMap | None) -> None:
    paths = list_packages(args.packages_dir) if args.packages_dir else [Path(p) for p in args.package]
    check_unique_names(paths)
    dataset_dir = Path(args.output_dir)
    for sub in ("images", MASKS_DIR):
        (dataset_dir / sub).mkdir(parents=True, exist_ok=True)
    remove_leftovers(dataset_dir)
    check_layout_file(dataset_dir, layout)

    rows = read_rows(dataset_dir) if (dataset_dir / ROWS_FILE).is_file() else []
    done = {row.get("package") for row in rows if (dataset_dir / str(row.get("image", ""))).is_file()}
    todo = [p for p in paths if package_name(p) not in done]
    saver = RowSaver(dataset_dir, rows, {package_name(p): i for i, p in enumerate(paths)})
    skipped: dict[str, str] = {}
    unused: dict[str, list[str]] = {}
    warnings: dict[str, str] = {}

    map_note = f", element map '{element_map.name}'" if element_map else ""
    print(f"{len(paths)} packages: {len(paths) - len(todo)} already merged, {len(todo)} to merge with layout "
          f"'{layout.name}' at {layout.width}x{layout.height}{map_note}")
    jobs = [(str(p), layout, element_map, str(dataset_dir), args.skip_incomplete) for p in todo]
    pool = multiprocessing.Pool(args.num_workers) if args.num_workers > 1 and len(jobs) > 1 else None
    results = pool.imap_unordered(merge_one, jobs) if pool else map(merge_one, jobs)
    try:
        for result in tqdm(results, total=len(jobs), desc="merge", unit="skin"):
            name = result["package"]
            if "skipped" in result:
                skipped[name] = result["skipped"]
                continue
            unused[name] = result["unused"]
            if result["warning"]:
                warnings[name] = result["warning"]
                if args.verbose or len(warnings) <= SHOWN_WARNINGS:  # thousands of packages: a few, then a count
                    tqdm.write(f"warning: {result['warning']}")
            if args.verbose:
                tqdm.write("\n".join(result["choices"]))
            saver.add(name, {"image": f"images/{name}.png", "package": name, "layout": layout.name,
                             "elements": result["placements"],
                             **({"source_package": result["source_package"]} if "source_package" in result else {})})  # fmt: skip
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        saver.save()

    merged = len(todo) - len(skipped)
    atomic_write_json(dataset_dir / "merge_report.json", {
        "layout": layout.name, "resolution": layout.resolution, "element_map": element_map.name if element_map else None,
        "merged": merged, "already_merged": len(paths) - len(todo), "skipped": skipped, "unused_files": unused,
        "warnings": warnings,
    })  # fmt: skip
    if len(warnings) > SHOWN_WARNINGS and not args.verbose:
        print(f"warning: {len(warnings) - SHOWN_WARNINGS} more package(s) with warnings ({len(warnings)} in all): each "
              f"is in {dataset_dir / 'merge_report.json'} (\"warnings\")")
    if args.verbose:
        for name, files in unused.items():
            if files:
                print(f"{name}: files no element of '{layout.name}' uses: {', '.join(files)}")
    print(f"merged {merged}, already merged {len(paths) - len(todo)}, skipped {len(skipped)}; "
          f"rows in {dataset_dir / ROWS_FILE}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    if not saver.rows:
        raise SkingenError(
            f"{dataset_dir / ROWS_FILE}: no package could be merged ({len(skipped)} skipped, reasons above); "
            "fix the packages or the layout/element map before the next stage"
        )


def render_one(job: tuple[str, str, str, int | None, str, bool]) -> dict:
    """Draw one Baidu package's own keyboard and save it; runs in a worker process."""
    package_path, keyboard, orientation, width, dataset_dir, skip_incomplete = job
    name = package_name(package_path)
    try:
        result = render_package_row(package_path, name, keyboard, orientation, width)
    except SkingenError as err:
        if skip_incomplete:
            return {"package": name, "skipped": str(err)}
        raise
    atomic_save_image(result.image, Path(dataset_dir) / "images" / f"{name}.png")
    return {"package": name, "row": {"image": f"images/{name}.png", **result.row, "resolution": width}, "warnings": result.warnings,
            "demo_edge_f1": result.demo_f1}  # fmt: skip


def merge_package_keyboards(args: argparse.Namespace) -> None:
    """--layout package: each package's own keyboard, with its exact boxes and strings, one row per package."""
    paths = list_packages(args.packages_dir) if args.packages_dir else [Path(p) for p in args.package]
    check_unique_names(paths)
    dataset_dir = Path(args.output_dir)
    if (dataset_dir / LAYOUT_RECORD).is_file():
        raise SkingenError(f"{dataset_dir / LAYOUT_RECORD}: this dataset holds atlases of a layout spec; write the "
                           f"packages' own keyboards (--layout {PACKAGE_LAYOUT}) to another --output_dir")
    (dataset_dir / "images").mkdir(parents=True, exist_ok=True)
    remove_leftovers(dataset_dir, subfolders=("images",))
    rows = read_rows(dataset_dir) if (dataset_dir / ROWS_FILE).is_file() else []
    wanted = {"keyboard": args.keyboard, "orientation": args.orientation, "resolution": args.resolution}
    done = {row.get("package") for row in rows if (dataset_dir / str(row.get("image", ""))).is_file()
            and all(row.get(k) == v for k, v in wanted.items())}  # fmt: skip
    todo = [p for p in paths if package_name(p) not in done]
    saver = RowSaver(dataset_dir, rows, {package_name(p): i for i, p in enumerate(paths)})
    print(f"{len(paths)} packages: {len(paths) - len(todo)} already drawn, {len(todo)} to draw: keyboard "
          f"'{args.keyboard}' ({args.orientation}) at width {args.resolution or 'as designed'}")
    jobs = [(str(p), args.keyboard, args.orientation, args.resolution, str(dataset_dir), args.skip_incomplete) for p in todo]
    skipped, warnings, faithfulness = {}, {}, {}
    pool = multiprocessing.Pool(args.num_workers) if args.num_workers > 1 and len(jobs) > 1 else None
    try:
        for result in tqdm(pool.imap_unordered(render_one, jobs) if pool else map(render_one, jobs),
                           total=len(jobs), desc="draw", unit="skin"):  # fmt: skip
            name = result["package"]
            if "skipped" in result:
                skipped[name] = result["skipped"]
                continue
            for line in result["warnings"]:
                warnings.setdefault(name, []).append(line)
                if args.verbose or sum(map(len, warnings.values())) <= SHOWN_WARNINGS:
                    tqdm.write(f"warning: {line}")
            if result["demo_edge_f1"] is not None:
                faithfulness[name] = result["demo_edge_f1"]
            saver.add(name, result["row"])
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        saver.save()
    total_warnings = sum(map(len, warnings.values()))
    mean_f1 = sum(faithfulness.values()) / len(faithfulness) if faithfulness else None
    atomic_write_json(dataset_dir / "merge_report.json", {
        "layout": PACKAGE_LAYOUT, **wanted, "merged": len(todo) - len(skipped),
        "already_merged": len(paths) - len(todo), "skipped": skipped, "warnings": warnings,
        "demo_edge_f1": faithfulness, "demo_edge_f1_mean": mean_f1,
    })  # fmt: skip
    if total_warnings > SHOWN_WARNINGS and not args.verbose:
        print(f"warning: {total_warnings - SHOWN_WARNINGS} more warning(s) ({total_warnings} in all): each is in "
              f"{dataset_dir / 'merge_report.json'} (\"warnings\")")
    if mean_f1 is not None:
        print(f"faithfulness: edge F1 against the packages' demo.png {mean_f1:.3f} (mean of {len(faithfulness)})")
    print(f"drew {len(todo) - len(skipped)}, already drawn {len(paths) - len(todo)}, skipped {len(skipped)}; "
          f"rows in {dataset_dir / ROWS_FILE}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    if not saver.rows:
        raise SkingenError(f"{dataset_dir / ROWS_FILE}: no package could be drawn ({len(skipped)} skipped, reasons above)")


def merge_records(dataset_dir: Path) -> dict[str, dict]:
    """Per package name: its row's ``elements`` and alpha image path, from a merged dataset."""
    records = {}
    for row in read_rows(dataset_dir):
        name = row.get("package")
        if isinstance(name, str) and isinstance(row.get("elements"), list):
            records[name] = {"elements": row["elements"], "alpha": dataset_dir / MASKS_DIR / f"{name}.png"}
    return records


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
    records = merge_records(Path(args.dataset_dir)) if args.dataset_dir else {}
    default_layout = load_layout(args.layout, args.resolution)
    output_dir = Path(args.output_dir)
    remove_leftovers(output_dir, subfolders=())
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
        record = records.get(path.stem)
        if args.dataset_dir and record is None:
            tqdm.write(f"warning: {path.name}: no row of package '{path.stem}' in {args.dataset_dir}; split by the layout alone")
        boxes = {e.id: list(e.box) for e in layout.elements}
        if record is not None and any(boxes.get(r.get("id")) != r.get("box") for r in record["elements"]):
            tqdm.write(f"warning: {path.name}: the row in {args.dataset_dir} was merged with other boxes (another layout "
                       f"or size than '{layout.name}' at {layout.width}x{layout.height}); split by the layout alone")
            record = None
        alpha = None
        if record is not None and record["alpha"].is_file():
            with Image.open(record["alpha"]) as mask:
                alpha = mask.convert("L")
        split_atlas(path, layout, target, record=record["elements"] if record else None, alpha=alpha, name=path.stem)
        written += 1
    print(f"split {written} atlases into {output_dir} ({len(inputs) - written} already there)")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.split:
        split_to_bds(args) if args.format == "bds" else split_atlases(args)
        return
    if args.layout == PACKAGE_LAYOUT:
        merge_package_keyboards(args)
        return
    layout = load_layout(args.layout, args.resolution)
    element_map = load_element_map(args.element_map) if args.element_map else None
    if element_map is not None:
        check_map_against_layout(element_map, layout)
    merge_packages(args, layout, element_map)


if __name__ == "__main__":
    run_cli(main)
