"""Conditioning images for a dataset folder: ``canny`` edges, one shared layout ``template``,
the template plus each image's own text re-rendered at its OCR boxes (``glyph``), the Canny edges of one
reference skin shared by every row (``reference``, as the original experiments 1-3), or that shared image plus
each row's own text (``reference_glyph``).

    python render_glyphs.py --dataset_dir datasets/keyboard_512 --mode glyph --layout key_elements --resolution 512
    python render_glyphs.py --dataset_dir datasets/keyboard_512 --mode reference --reference_image ref.png

Writes ``conditioning_images/`` and sets each row's ``conditioning_image`` (glyph modes
also ``box`` + ``texts``) in ``train.jsonl``, keeping every other field. ``--output_column`` writes another kind
next to it (``--mode canny --output_column conditioning_image_canny``: folder ``conditioning_image_canny/``), for a
ControlNet trained on several conditioning columns. A rerun skips
rows already done with the same settings (kept in ``conditioning_images/settings.json``), so an
interrupted run resumes (each batch's rows are kept in a part file under ``.parts/``, merged into train.jsonl
at the end) and changed settings redo everything; ``--overwrite`` redoes it all anyway. Temp files of a run
killed midway are removed first. Launched on several processes (``accelerate launch``, ``torchrun``, ``srun``;
docs/cluster.md) the rows are split between them and train.jsonl comes out the same; ``--num_workers`` adds
worker processes for the OCR and drawing.
"""

from __future__ import annotations

import argparse
import json
import sys
from hashlib import sha256
from pathlib import Path

import numpy as np
from PIL import Image

from skingen import sharding
from skingen.config import parse_args_with_config
from skingen.data import dataset as data
from skingen.data import rows
from skingen.data.images import open_rgb
from skingen.errors import SkingenError, run_cli
from skingen.fileio import atomic_save_image, atomic_write_json, remove_stale_temp_files
from skingen.prep.glyphs import GlyphCounts, canny_control, find_cjk_font, keep_ocr_lines, render_glyph_control
from skingen.prep.ocr import BACKENDS, get_ocr
from skingen.skins.bds.dataset import boxes_template, exact_text_lines
from skingen.skins.layout import LAYOUT_RECORD, Layout, load_layout, render_template

CONDITIONING_DIR = "conditioning_images"
TEMPLATE_NAME = f"{CONDITIONING_DIR}/template.png"
REFERENCE_NAME = f"{CONDITIONING_DIR}/reference.png"
MODES = ("canny", "template", "glyph", "reference", "reference_glyph")
SHARED_MODES = ("template", "reference")  # one image for every row
GLYPH_MODES = ("glyph", "reference_glyph")  # OCR text drawn onto a shared base image, one image per row
SETTINGS_NAME = f"{CONDITIONING_DIR}/settings.json"


def output_folder(column: str) -> str:
    """Where a column's images go: ``conditioning_images/`` for ``conditioning_image``, else the column's name."""
    return CONDITIONING_DIR if column == "conditioning_image" else column


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", type=str, default=None, help="Dataset folder with train.jsonl and images/.")
    parser.add_argument("--mode", type=str, default=None, choices=MODES)
    parser.add_argument(
        "--output_column", type=str, default="conditioning_image",
        help="Row key to write (default conditioning_image); e.g. conditioning_image_canny keeps the existing "
        "conditioning images and adds a second kind in its own folder.",
    )
    parser.add_argument(
        "--reference_image",
        type=str,
        default=None,
        help="reference/reference_glyph modes: the skin whose Canny edges (--low/--high_threshold) every row shares.",
    )
    parser.add_argument("--low_threshold", type=int, default=50, help="Canny lower hysteresis threshold.")
    parser.add_argument("--high_threshold", type=int, default=80, help="Canny upper hysteresis threshold.")
    parser.add_argument(
        "--layout",
        type=str,
        default=None,
        help="Layout name (configs/layouts/<name>.yaml) or YAML path for template/glyph; default: the one "
        "merge_elements.py recorded (layout.json in the dataset folder, else the rows' `layout` name).",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Canvas width to draw the layout template at (one of the layout's resolutions); "
        "default: the recorded one, else the images' width.",
    )
    parser.add_argument(
        "--min_confidence", type=float, default=0.98, help="Glyph mode: keep OCR lines scoring at least this."
    )
    parser.add_argument(
        "--font", type=str, default=None, help="Glyph mode: font with Chinese glyphs (default: found via fontconfig)."
    )
    parser.add_argument("--ocr_backend", type=str, default="rapidocr", choices=list(BACKENDS))
    parser.add_argument(
        "--ocr_num_threads", type=int, default=-1, help="rapidocr: onnxruntime threads (-1: all cores)."
    )
    parser.add_argument(
        "--det_model_dir", type=str, default=None, help="paddle: local text-detection inference model folder."
    )
    parser.add_argument(
        "--rec_model_dir", type=str, default=None, help="paddle: local text-recognition inference model folder."
    )
    parser.add_argument(
        "--use_angle_cls", action="store_true", help="paddle: classify each line's orientation (0/180)."
    )
    parser.add_argument(
        "--batch_size", type=int, default=8, help="Rows per batch; each finished batch is kept as a part file (a killed run redoes at most one)."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Redo every image, even those already made with the same settings."
    )
    parser.add_argument(
        "--num_workers", type=int, default=1,
        help="Worker processes for the per-image work (OCR, Canny, drawing) in each launched process.",
    )
    sharding.add_shard_arguments(parser)
    args = parse_args_with_config(parser, argv)
    if args.dataset_dir is None:
        parser.error("--dataset_dir is required")
    if args.mode is None:
        parser.error(f"--mode is required: {', '.join(MODES)}")
    if args.mode.startswith("reference") and not args.reference_image:
        parser.error(f"--mode {args.mode} needs --reference_image PATH (the skin whose edges every row shares)")
    if args.batch_size < 1 or args.num_workers < 1:
        parser.error("--batch_size and --num_workers must be at least 1")
    sharding.check_shard_arguments(args)
    if args.overwrite and args.num_shards > 1:
        parser.error("--overwrite with --num_shards: each shard would drop the others' parts; run once without "
                     "--num_shards, or delete the conditioning images first")
    if not args.output_column.startswith("conditioning_image") or not args.output_column.replace("_", "").isalnum():
        parser.error(f"--output_column {args.output_column}: use conditioning_image or conditioning_image_<kind> "
                     "(letters, digits, underscores)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dataset_dir = Path(args.dataset_dir)
    checked = data.read_checked_rows(dataset_dir, rows.RENDER)
    reference = load_reference(args) if args.mode.startswith("reference") else None
    # Rows with exact labels (a package's own keyboard) carry their boxes: glyph mode draws on their own template.
    all_exact = all(row.raw.get("texts_exact") for row in checked)
    needs_layout = args.mode == "template" or (args.mode == "glyph" and not all_exact)
    layout = dataset_layout(args, dataset_dir, checked) if needs_layout else None
    font = find_cjk_font(args.font) if args.mode in GLYPH_MODES else None
    folder = output_folder(args.output_column)
    settings = run_settings(args, layout, font)
    shard = sharding.shard_for(dataset_dir, f"render_glyphs_{args.output_column}", settings, args)
    settings_changed = shard.group.on_main(lambda: prepare_run(args, dataset_dir, checked, settings, shard))
    if settings_changed:  # the main process forgot the old images in its rows and in train.jsonl: so do the others
        for row in checked:
            row.raw.pop(args.output_column, None)
    if args.mode == "template":
        shard.group.on_main(lambda: render_shared(
            args, dataset_dir, checked, TEMPLATE_NAME.replace(CONDITIONING_DIR, folder, 1),
            lambda: render_template(layout).convert("RGB"), settings_changed,
        ))
    elif args.mode == "reference":
        shard.group.on_main(lambda: render_shared(
            args, dataset_dir, checked, REFERENCE_NAME.replace(CONDITIONING_DIR, folder, 1), lambda: reference,
            settings_changed,
        ))
    else:
        base = None
        if args.mode == "glyph" and layout is not None:
            base = render_template(layout).convert("RGB")
        elif args.mode == "reference_glyph":
            base = reference
        render_per_image(args, dataset_dir, checked, base, font, shard)


def prepare_run(args, dataset_dir: Path, checked: list[rows.Row], settings: dict, shard: sharding.Shard) -> bool:
    """Main process, before any image: temp files of a killed run, this run's settings, parts of other settings."""
    if shard.whole_job:  # job-array tasks run side by side: leave another task's temp files alone
        removed = remove_stale_temp_files(dataset_dir) + remove_stale_temp_files(
            dataset_dir / output_folder(args.output_column), True
        )
        if removed:
            print(f"removed {removed} temp file(s) left by an interrupted run")
    settings_changed = start_run(dataset_dir, checked, settings, args.output_column)
    shard.parts.prepare(overwrite=args.overwrite)
    return settings_changed


def load_reference(args) -> Image.Image:
    """The Canny edges of --reference_image, the control every row shares in the reference modes."""
    image = open_rgb(Path(args.reference_image).expanduser(), "--reference_image")
    return canny_control(image, args.low_threshold, args.high_threshold)


def run_settings(args, layout, font) -> dict:
    """Everything that shapes the images of this mode; outputs made under other settings are redone."""
    settings = {"mode": args.mode}
    if args.mode == "canny" or args.mode.startswith("reference"):
        settings.update(low_threshold=args.low_threshold, high_threshold=args.high_threshold)
    if args.mode.startswith("reference"):
        reference = Path(args.reference_image).expanduser()
        settings.update(reference_sha256=sha256(reference.read_bytes()).hexdigest())
    if layout is not None:
        # The boxes themselves, not where they came from: an edited spec redoes the images, a moved one does not.
        boxes = json.dumps({k: v for k, v in layout.to_dict().items() if k != "path"}, sort_keys=True)
        settings.update(
            layout=layout.name, resolution=layout.resolution, layout_sha256=sha256(boxes.encode()).hexdigest()
        )
    if args.mode in GLYPH_MODES:
        settings.update(min_confidence=args.min_confidence, font=str(font), ocr_backend=args.ocr_backend)
        if args.ocr_backend == "paddle":
            settings.update(ocr_options(args))
    return settings


def start_run(dataset_dir: Path, checked: list[rows.Row], settings: dict, column: str = "conditioning_image") -> bool:
    """Record this run's settings beside its images. If they differ from the last run's (another mode,
    thresholds, layout...), rows forget their conditioning images first, so none counts as done."""
    path = dataset_dir / SETTINGS_NAME.replace(CONDITIONING_DIR, output_folder(column), 1)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        recorded = None
    if recorded == settings:
        return False
    if any(column in row.raw for row in checked):
        for row in checked:
            row.raw.pop(column, None)
        save_rows(dataset_dir, checked)
    atomic_write_json(path, settings)
    return True


def save_rows(dataset_dir: Path, checked: list[rows.Row]) -> None:
    data.write_rows(dataset_dir, [row.raw for row in checked])


def render_shared(args, dataset_dir: Path, checked: list[rows.Row], name: str, draw, settings_changed: bool) -> None:
    """One image (``draw()``) for every row: the layout template or the reference edges."""
    path = dataset_dir / name
    if args.overwrite or settings_changed or not path.is_file():
        atomic_save_image(draw(), path)
    changed = [row for row in checked if row.raw.get(args.output_column) != name]
    for row in changed:
        row.raw[args.output_column] = name
    if changed:
        save_rows(dataset_dir, checked)
    print(f"{args.mode}: {path} shared by {len(checked)} rows ({len(changed)} rows updated)")


def render_per_image(args, dataset_dir: Path, checked: list[rows.Row], base: Image.Image | None, font,
                     shard: sharding.Shard) -> None:
    """Canny or glyph images, one per row, in batches over the launched processes and --num_workers workers;
    finished rows are kept in part files, merged into train.jsonl at the end (and on Ctrl-C), so a rerun resumes."""
    glyph = args.mode in GLYPH_MODES
    finished = shard.parts.read()
    for row in checked:
        if row.row_id in finished:
            row.raw.update(finished[row.row_id].fields)
    todo = [
        (position, row) for position, row in enumerate(checked)
        if args.overwrite or not is_done(dataset_dir, row, glyph, args.output_column)
    ]
    if shard.group.is_main:
        print(f"{args.mode}: {len(checked)} rows, {len(checked) - len(todo)} already done, {len(todo)} to render")

    def merge(entries: dict[str, sharding.Entry]) -> dict:
        for row in checked:
            if row.row_id in entries:
                row.raw.update(entries[row.row_id].fields)
        if entries:
            save_rows(dataset_dir, checked)
        return sharding.sum_notes(entries.values())

    workers = args.num_workers if todo else 1
    with sharding.WorkerPool(workers, render_row, ControlRenderer, (args, dataset_dir, base, font)) as pool:
        try:
            shard.run(todo, pool.map, batch_size=args.batch_size,
                      desc=f"{args.mode} images")
        except KeyboardInterrupt:
            shard.merge_on_interrupt(merge)
            raise
    counts = shard.finish(merge)
    if glyph and counts is not None and shard.group.is_main:
        counts = GlyphCounts(**{name: counts.get(name, 0) for name in vars(GlyphCounts())})
        print(
            f"{args.mode}: {len(todo)} rows rendered; text lines found {counts.found}, kept {counts.kept} "
            f"(score >= {args.min_confidence}); rows with no kept text: {counts.rows_without_text}"
        )
        if counts.low_score or counts.unusable_box:
            print(
                f"warning: {args.mode}: dropped {counts.low_score + counts.unusable_box} of {counts.found} text lines: "
                f"{counts.low_score} scored below {args.min_confidence} or were blank, {counts.unusable_box} had a box "
                "with no area or outside the image",
                file=sys.stderr,
            )


class ControlRenderer:
    """What one worker needs to make a row's control image: the settings, the base image, an OCR engine."""

    def __init__(self, args, dataset_dir: Path, base: Image.Image | None, font):
        self.args, self.dataset_dir, self.base, self.font = args, dataset_dir, base, font
        self.glyph = args.mode in GLYPH_MODES
        self._ocr = None

    @property
    def ocr(self):
        """The OCR engine, built at the first row that needs it (rows with exact labels need none)."""
        if self._ocr is None:
            self._ocr = get_ocr(self.args.ocr_backend, **ocr_options(self.args))
        return self._ocr


def render_row(renderer: ControlRenderer, row: rows.Row) -> sharding.Entry:
    """One row's control image, saved atomically; its row fields (and glyph counts) as a part entry."""
    args = renderer.args
    image = open_rgb(row.image.path, row.where)
    target = conditioning_path_for(row.image.rel, output_folder(args.output_column))
    fields, counts = {args.output_column: target}, GlyphCounts()
    if renderer.glyph and row.raw.get("texts_exact"):  # the package says every string: no OCR
        good = exact_text_lines(row.raw)
        base = renderer.base if renderer.base is not None else boxes_template(image.size, row.raw["box"])
        control = render_glyph_control(base, good, renderer.font)
        counts.found += len(good)
        counts.kept += len(good)
    elif renderer.glyph:
        check_same_size(renderer.base, image, row, args.mode)
        lines = renderer.ocr.read_batch([np.asarray(image)])[0]
        good = keep_ocr_lines(lines, image.size, args.min_confidence, counts)
        control = render_glyph_control(renderer.base, good, renderer.font)
        fields.update(box=[line.quad for line in good], texts=[line.text for line in good])
    else:
        control = canny_control(image, args.low_threshold, args.high_threshold)
    atomic_save_image(control, renderer.dataset_dir / target)
    return sharding.Entry(row.row_id, fields, vars(counts) if renderer.glyph else {})


def is_done(dataset_dir: Path, row: rows.Row, glyph: bool, column: str = "conditioning_image") -> bool:
    target = conditioning_path_for(row.image.rel, output_folder(column))
    if row.raw.get(column) != target or not (dataset_dir / target).is_file():
        return False
    return not glyph or ("box" in row.raw and "texts" in row.raw)


def conditioning_path_for(image_rel: str, folder: str = CONDITIONING_DIR) -> str:
    """``images/a/b.jpg`` -> ``conditioning_images/a/b.png`` (keeping sub-folders avoids name clashes)."""
    rel = Path(image_rel)
    if rel.parts and rel.parts[0] == "images":
        rel = Path(*rel.parts[1:])
    return (Path(folder) / rel.with_suffix(".png")).as_posix()


def dataset_layout(args, dataset_dir: Path, checked: list[rows.Row]) -> Layout:
    """The layout to draw: --layout; else the record merge_elements.py wrote (layout.json: exactly the boxes
    the images were merged with); else the rows' ``layout`` name. Size: --resolution, else the record's,
    else the first image's width."""
    record = dataset_dir / LAYOUT_RECORD
    if args.layout is None and record.is_file():
        return load_layout(record, resolution=args.resolution)
    name_or_path = args.layout or rows_layout_name(dataset_dir, checked)
    resolution = args.resolution if args.resolution is not None else checked[0].image.size[0]
    return load_layout(name_or_path, resolution=resolution)


def rows_layout_name(dataset_dir: Path, checked: list[rows.Row]) -> str:
    names = sorted(
        {row.raw["layout"] for row in checked if isinstance(row.raw.get("layout"), str) and row.raw["layout"]}
    )
    if len(names) > 1:
        raise SkingenError(
            f"{dataset_dir / 'train.jsonl'}: rows use several layouts ({', '.join(names)}); "
            "a template needs one: pass --layout"
        )
    if not names:
        raise SkingenError(
            f"{dataset_dir}: no layout recorded (no {LAYOUT_RECORD}, no `layout` field in train.jsonl); "
            "pass --layout NAME_OR_YAML"
        )
    return names[0]


def check_same_size(base: Image.Image, image: Image.Image, row: rows.Row, mode: str) -> None:
    # Boxes are in image pixels, so the glyphs only land right on a base image of the image's size.
    if base.size == image.size:
        return
    if mode == "reference_glyph":
        fix = "use a reference skin of the dataset's image size"
        what = "the reference image"
    else:
        fix = "pass the --layout and --resolution the images were merged with"
        what = "the layout template"
    raise SkingenError(
        f"{row.where}: image {row.image.rel} is {image.width}x{image.height} but {what} is "
        f"{base.width}x{base.height}; {fix}"
    )


def ocr_options(args) -> dict:
    if args.ocr_backend == "paddle":
        return {
            "det_model_dir": args.det_model_dir,
            "rec_model_dir": args.rec_model_dir,
            "use_angle_cls": args.use_angle_cls,
        }
    return {"num_threads": args.ocr_num_threads}


if __name__ == "__main__":
    run_cli(main)
