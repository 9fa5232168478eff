"""Conditioning images for a dataset folder: ``canny`` edges, one shared layout ``template``,
or the template plus each image's own text re-rendered at its OCR boxes (``glyph``).

    python render_glyphs.py --dataset_dir datasets/keyboard_512 --mode glyph --layout key_elements --resolution 512

Writes ``conditioning_images/`` and sets each row's ``conditioning_image`` (glyph mode
also ``box`` + ``texts``) in ``train.jsonl``, keeping every other field. A rerun skips
rows already done with the same settings (kept in ``conditioning_images/settings.json``), so an
interrupted run resumes and changed settings redo everything; ``--overwrite`` redoes it all anyway.
"""

from __future__ import annotations

import argparse
import json
from hashlib import sha256
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from skingen import data
from skingen.config import parse_args_with_config
from skingen.errors import SkingenError, run_cli
from skingen.fileio import atomic_save_image, atomic_write_json
from skingen.glyphs import canny_control, find_cjk_font, render_glyph_control
from skingen.layout import LAYOUT_RECORD, Layout, load_layout, render_template
from skingen.ocr import BACKENDS, get_ocr

CONDITIONING_DIR = "conditioning_images"
TEMPLATE_NAME = f"{CONDITIONING_DIR}/template.png"
SETTINGS_NAME = f"{CONDITIONING_DIR}/settings.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", type=str, default=None, help="Dataset folder with train.jsonl and images/.")
    parser.add_argument("--mode", type=str, default=None, choices=["canny", "template", "glyph"])
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
        "--batch_size", type=int, default=8, help="Images per OCR call; train.jsonl is saved after each batch."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Redo every image, even those already made with the same settings."
    )
    args = parse_args_with_config(parser, argv)
    if args.dataset_dir is None:
        parser.error("--dataset_dir is required")
    if args.mode is None:
        parser.error("--mode is required: canny, template or glyph")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dataset_dir = Path(args.dataset_dir)
    rows = data.read_rows(dataset_dir)
    layout = None if args.mode == "canny" else dataset_layout(args, dataset_dir, rows)
    font = find_cjk_font(args.font) if args.mode == "glyph" else None
    settings_changed = start_run(dataset_dir, rows, run_settings(args, layout, font))
    if args.mode == "template":
        render_shared_template(args, dataset_dir, rows, layout, settings_changed)
    else:
        render_per_image(args, dataset_dir, rows, layout, font)


def run_settings(args, layout, font) -> dict:
    """Everything that shapes the images of this mode; outputs made under other settings are redone."""
    settings = {"mode": args.mode}
    if args.mode == "canny":
        return {**settings, "low_threshold": args.low_threshold, "high_threshold": args.high_threshold}
    # The boxes themselves, not where they came from: an edited spec redoes the images, a moved one does not.
    boxes = json.dumps({k: v for k, v in layout.to_dict().items() if k != "path"}, sort_keys=True)
    settings.update(layout=layout.name, resolution=layout.resolution, layout_sha256=sha256(boxes.encode()).hexdigest())
    if args.mode == "glyph":
        settings.update(min_confidence=args.min_confidence, font=str(font), ocr_backend=args.ocr_backend)
        if args.ocr_backend == "paddle":
            settings.update(ocr_options(args))
    return settings


def start_run(dataset_dir: Path, rows: list[dict], settings: dict) -> bool:
    """Record this run's settings beside its images. If they differ from the last run's (another mode,
    thresholds, layout...), rows forget their conditioning images first, so none counts as done."""
    path = dataset_dir / SETTINGS_NAME
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        recorded = None
    if recorded == settings:
        return False
    if any("conditioning_image" in row for row in rows):
        for row in rows:
            row.pop("conditioning_image", None)
        data.write_rows(dataset_dir, rows)
    atomic_write_json(path, settings)
    return True


def render_shared_template(args, dataset_dir: Path, rows: list[dict], layout, settings_changed: bool) -> None:
    """One template image for every row."""
    path = dataset_dir / TEMPLATE_NAME
    if args.overwrite or settings_changed or not path.is_file():
        atomic_save_image(render_template(layout).convert("RGB"), path)
    changed = [row for row in rows if row.get("conditioning_image") != TEMPLATE_NAME]
    for row in changed:
        row["conditioning_image"] = TEMPLATE_NAME
    if changed:
        data.write_rows(dataset_dir, rows)
    print(f"template: {path} shared by {len(rows)} rows ({len(changed)} rows updated)")


def render_per_image(args, dataset_dir: Path, rows: list[dict], layout, font) -> None:
    """Canny or glyph images, one per row, in batches; rows are saved after each batch so a rerun resumes."""
    glyph = args.mode == "glyph"
    todo = [i for i, row in enumerate(rows) if args.overwrite or not is_done(dataset_dir, row, glyph)]
    print(f"{args.mode}: {len(rows)} rows, {len(rows) - len(todo)} already done, {len(todo)} to render")
    if not todo:
        return
    for index in todo:  # a wrong path fails now, not hours into the run
        row_image_path(dataset_dir, rows[index], index)
    if glyph:
        template = render_template(layout).convert("RGB")
        ocr = get_ocr(args.ocr_backend, **ocr_options(args))
    found = kept = without_text = 0
    with tqdm(total=len(todo), desc=f"{args.mode} images", unit="img") as progress:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            images = [load_row_image(dataset_dir, rows[i], i) for i in batch]
            lines = ocr.read_batch([np.asarray(image) for image in images]) if glyph else [None] * len(batch)
            for index, image, image_lines in zip(batch, images, lines):
                row = rows[index]
                target = conditioning_path_for(row["image"])
                if glyph:
                    check_same_size(template, image, row, index)
                    good = [line for line in image_lines if line.score >= args.min_confidence and line.text.strip()]
                    found, kept, without_text = found + len(image_lines), kept + len(good), without_text + (not good)
                    control = render_glyph_control(template, good, font)
                    row["box"] = [line.quad for line in good]
                    row["texts"] = [line.text for line in good]
                else:
                    control = canny_control(image, args.low_threshold, args.high_threshold)
                atomic_save_image(control, dataset_dir / target)
                row["conditioning_image"] = target
                progress.update(1)
            data.write_rows(dataset_dir, rows)
    if glyph:
        print(
            f"glyph: {len(todo)} rows rendered; text lines found {found}, kept {kept} "
            f"(score >= {args.min_confidence}); rows with no kept text: {without_text}"
        )


def is_done(dataset_dir: Path, row: dict, glyph: bool) -> bool:
    target = conditioning_path_for(row.get("image", ""))
    if row.get("conditioning_image") != target or not (dataset_dir / target).is_file():
        return False
    return not glyph or ("box" in row and "texts" in row)


def conditioning_path_for(image_rel: str) -> str:
    """``images/a/b.jpg`` -> ``conditioning_images/a/b.png`` (keeping sub-folders avoids name clashes)."""
    rel = Path(image_rel)
    if rel.parts and rel.parts[0] == "images":
        rel = Path(*rel.parts[1:])
    return (Path(CONDITIONING_DIR) / rel.with_suffix(".png")).as_posix()


def row_where(dataset_dir: Path, index: int) -> str:
    return f"{dataset_dir / 'train.jsonl'}: row {index + 1}"


def row_image_path(dataset_dir: Path, row: dict, index: int) -> Path:
    where = row_where(dataset_dir, index)
    rel = row.get("image")
    if not isinstance(rel, str) or not rel:
        raise SkingenError(f"{where}: no `image` path; every row needs one (relative to {dataset_dir})")
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise SkingenError(f"{where}: image path {rel!r} leaves the dataset folder; make it relative to {dataset_dir}")
    path = dataset_dir / rel
    if not path.is_file():
        raise SkingenError(f"{where}: image {rel} not found (looked for {path}); fix the path or drop the row")
    return path


def load_row_image(dataset_dir: Path, row: dict, index: int) -> Image.Image:
    """The row's image as RGB, converted the way the training loader converts it (transparency on white)."""
    return data.open_rgb(row_image_path(dataset_dir, row, index), row_where(dataset_dir, index))


def dataset_layout(args, dataset_dir: Path, rows: list[dict]) -> Layout:
    """The layout to draw: --layout; else the record merge_elements.py wrote (layout.json: exactly the boxes
    the images were merged with); else the rows' ``layout`` name. Size: --resolution, else the record's,
    else the first image's width."""
    record = dataset_dir / LAYOUT_RECORD
    if args.layout is None and record.is_file():
        return load_layout(record, resolution=args.resolution)
    name_or_path = args.layout or rows_layout_name(dataset_dir, rows)
    resolution = args.resolution
    if resolution is None and rows:
        resolution = load_row_image(dataset_dir, rows[0], 0).width
    return load_layout(name_or_path, resolution=resolution)


def rows_layout_name(dataset_dir: Path, rows: list[dict]) -> str:
    names = sorted({row["layout"] for row in rows if isinstance(row.get("layout"), str) and row["layout"]})
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


def check_same_size(template: Image.Image, image: Image.Image, row: dict, index: int) -> None:
    # Boxes are in image pixels, so the glyphs only land right on a template of the image's size.
    if template.size != image.size:
        raise SkingenError(
            f"row {index + 1}: image {row['image']} is {image.width}x{image.height} but the layout template is "
            f"{template.width}x{template.height}; pass the --layout and --resolution the images were merged with"
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
