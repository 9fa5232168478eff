"""Score every row of a dataset folder and keep the good ones: a filter for badly merged skins.

The seed hand-picked 102 of 2,000 skins because the layers of most did not line up with the
layout. This scores each row instead:

- layout lines found: the share of the layout's interior box outlines (``render_template`` of the dataset's
  layout.json, else of the row's layout, without the canvas border) that have a Canny edge of the image
  within ``--tolerance`` pixels: layers that do not line up with the layout leave its lines without edges.
  A layout with no interior line (``full_keyboard``) has nothing to check here;
- edge agreement (optional, ``--min_edge_f1``): F1 between the image's edges and all template outlines; it
  also counts the edges inside the boxes (keys, text), so it is low for whole-keyboard layouts by nature;
- blank: a near-uniform image (grey-level standard deviation below ``--min_std``);
- duplicates: identical pixels, or a perceptual hash (192-bit colour DCT hash) within
  ``--max_hash_distance`` bits of an earlier row; the first occurrence is kept.

    python scripts/filter_dataset.py --dataset_dir datasets/keyboard2k

The default ``--min_layout_recall`` keeps well-aligned skins of every stock layout (measured on synthetic
and Android-theme packages, docs/benchmarks.md) and drops layers shifted by a few percent of the canvas.
Writes ``filter_report.json`` and ``filter_report.md`` (scores, why each dropped row was dropped, the
score distributions to pick a threshold from) and the kept rows, unchanged, to ``train.filtered.jsonl`` in the dataset folder
(or ``--output_jsonl``). train.jsonl itself is never modified.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skingen.config import parse_args_with_config  # noqa: E402
from skingen.data.dataset import open_rgb, read_rows  # noqa: E402
from skingen.errors import SkingenError, run_cli  # noqa: E402
from skingen.evaluate.metrics import binarize_control, canny_control, edge_map_scores  # noqa: E402
from skingen.fileio import atomic_write_json, atomic_write_text, write_jsonl  # noqa: E402
from skingen.sharding import WorkerPool  # noqa: E402
from skingen.skins.layout import LAYOUT_RECORD, load_layout, render_template  # noqa: E402

CHUNK = 32  # rows handed to the workers at a time (the bar moves per chunk)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True, help="dataset folder holding train.jsonl")
    parser.add_argument(
        "--layout",
        help="layout name or YAML for every row; default: the dataset's layout.json, else each row's `layout` field",
    )
    parser.add_argument(
        "--min_layout_recall",
        type=float,
        default=0.8,
        help="rows where fewer of the layout's interior box outlines (share 0..1) have an image edge nearby are dropped",
    )
    parser.add_argument(
        "--min_edge_f1",
        type=float,
        default=0.0,
        help="also drop rows whose edge F1 with the whole layout template is lower (0 = off)",
    )
    parser.add_argument(
        "--tolerance",
        type=int,
        default=None,
        help="edge matching tolerance in pixels (default: 1%% of the template width, at least 3: a key's gap "
        "to its part's border grows with the canvas)",
    )
    parser.add_argument(
        "--min_std",
        type=float,
        default=4.0,
        help="grey-level standard deviation (0..255) below which an image counts as blank",
    )
    parser.add_argument(
        "--max_hash_distance",
        type=int,
        default=8,
        help="perceptual hashes this close (bits of 192) are near duplicates; -1 turns it off",
    )
    parser.add_argument("--num_workers", type=int, default=1, help="worker processes measuring the images")
    parser.add_argument("--output_jsonl", help="kept rows; default: <dataset_dir>/train.filtered.jsonl")
    parser.add_argument("--report_dir", help="where filter_report.json/md go; default: the dataset folder")
    args = parse_args_with_config(parser, argv)
    if args.num_workers < 1:
        raise SkingenError(f"--num_workers must be at least 1, got {args.num_workers}")
    if args.tolerance is not None and args.tolerance < 0:
        raise SkingenError(f"--tolerance must be >= 0 pixels, got {args.tolerance}")
    return args


def perceptual_hash(image: Image.Image) -> int:
    """192-bit colour DCT hash: per RGB channel, the 8x8 lowest frequencies of the 32x32 channel, each bit
    above/below their median. Per channel, because skins on one layout share their grey-level structure:
    a grey hash finds differently coloured skins of the same layout nearly identical."""
    small = cv2.resize(np.asarray(image.convert("RGB"), dtype=np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    bits = []
    for channel in range(3):
        low = cv2.dct(np.ascontiguousarray(small[..., channel]))[:8, :8].flatten()
        bits.extend(low > np.median(low[1:]))  # the DC term is left out of the median: it only tracks brightness
    return int("".join("1" if bit else "0" for bit in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class TemplateCache:
    """Layout templates: the dataset's layout.json (the boxes the images were merged with, at their size) unless
    --layout is given; else --layout or each row's ``layout``, drawn at the image's width when the layout has that
    resolution. An image of another size is compared after resizing it to the template."""

    def __init__(self, override: str | None, dataset_dir: Path):
        record = dataset_dir / LAYOUT_RECORD
        self.record = record if override is None and record.is_file() else None
        self.override = override
        self.dataset_dir = dataset_dir
        self.cache: dict[tuple[str, int | None], Image.Image] = {}

    def template(self, row: dict, width: int, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(all outlines, interior outlines) of the row's layout template as bool maps."""
        if self.record is not None:
            key = (str(self.record), None)
        else:
            name = self.override or row.get("layout")
            if not name:
                raise SkingenError(f'{where}: no "layout" field; pass --layout NAME_OR_YAML for rows that have none')
            candidate = self.dataset_dir / str(name)
            key = (str(candidate) if candidate.is_file() else str(name), width)
        if key not in self.cache:
            source, size = key
            layout = load_layout(source)
            if size in layout.resolutions and size != layout.resolution:
                layout = load_layout(source, resolution=size)
            outlines = binarize_control(render_template(layout))
            interior = outlines.copy()
            frame = 2 + 1  # the template's line width and one pixel: the canvas border is no layout line
            interior[:frame], interior[-frame:], interior[:, :frame], interior[:, -frame:] = False, False, False, False
            self.cache[key] = (outlines, interior)
        return self.cache[key]


def image_edges(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Canny edges (as the canny control makes them) of ``image`` at the template's ``size`` (height, width)."""
    pixels = np.asarray(image)
    if pixels.shape[:2] != size:
        pixels = cv2.resize(np.ascontiguousarray(pixels), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return np.asarray(canny_control(pixels))[..., 0] > 0


def measure_row(measurer: RowMeasurer, job: tuple[int, dict]) -> dict:
    """The per-image scores of one row (edges against its layout, spread, hashes): independent of other rows,
    so --num_workers processes measure rows side by side."""
    index, row = job
    where = f"{measurer.dataset_dir / 'train.jsonl'} row {index}"
    rel = row.get("image")
    if not isinstance(rel, str):
        raise SkingenError(f'{where}: "image" must be a path relative to the dataset folder, got {rel!r}')
    image = open_rgb(measurer.dataset_dir / rel, where)
    outlines, interior = measurer.templates.template(row, image.width, where)
    found = image_edges(image, outlines.shape)
    args = measurer.args
    tolerance = args.tolerance if args.tolerance is not None else max(3, round(outlines.shape[1] / 100))
    edges = edge_map_scores(found, outlines, tolerance)
    return {
        "image": rel,
        "edges": edges,
        "layout_recall": edge_map_scores(found, interior, tolerance).recall if interior.any() else None,
        "std": float(np.asarray(image.convert("L"), dtype=np.float32).std()),
        "digest": hashlib.sha1(np.asarray(image).tobytes() + str(image.size).encode()).hexdigest(),
        "phash": perceptual_hash(image),
    }


class RowMeasurer:
    """What a worker needs to measure rows: the flags, the dataset folder and its layout templates."""

    def __init__(self, args: argparse.Namespace, dataset_dir: Path):
        self.args, self.dataset_dir = args, dataset_dir
        self.templates = TemplateCache(args.layout, dataset_dir)


def score_rows(rows: list[dict], dataset_dir: Path, args: argparse.Namespace) -> list[dict]:
    """Scores and the keep/drop decision of every row; duplicates are decided in row order (the first is kept)."""
    seen = SeenImages()
    jobs = list(enumerate(rows, start=1))
    with WorkerPool(args.num_workers, measure_row, RowMeasurer, (args, dataset_dir)) as pool:
        chunks = [jobs[start : start + CHUNK] for start in range(0, len(jobs), CHUNK)]
        measured = (m for chunk in chunks for m in pool.map(chunk))
        bar = tqdm(measured, total=len(jobs), desc="scoring", unit="img")
        return [decide(index, m, seen, args) for (index, _), m in zip(jobs, bar)]


class SeenImages:
    """The rows kept so far, by pixel digest and by perceptual hash: what later rows may duplicate."""

    def __init__(self):
        self.first_by_pixels: dict[str, str] = {}
        self.kept_hashes: list[tuple[int, str]] = []


def decide(index: int, measured: dict, seen: SeenImages, args: argparse.Namespace) -> dict:
    """One row's verdict; a row that is no duplicate joins the rows later ones are compared with."""
    rel, edges, layout_recall, std = measured["image"], measured["edges"], measured["layout_recall"], measured["std"]
    digest, phash = measured["digest"], measured["phash"]
    first_by_pixels, kept_hashes = seen.first_by_pixels, seen.kept_hashes
    # Nearest earlier distinct image by hash; its distance is reported so a threshold can be chosen.
    nearest_distance, nearest = min(((hamming(h, phash), other) for h, other in kept_hashes), default=(None, None))
    duplicate_of = first_by_pixels.get(digest)
    if duplicate_of is None and nearest is not None and nearest_distance <= args.max_hash_distance:
        duplicate_of = nearest
    reasons, why = [], []
    if layout_recall is not None and layout_recall < args.min_layout_recall:
        why.append(
            f"only {layout_recall:.0%} of the layout's lines have an edge (--min_layout_recall {args.min_layout_recall:.0%})"
        )
    if edges.f1 < args.min_edge_f1:
        why.append(f"edge F1 {edges.f1:.3f} < --min_edge_f1 {args.min_edge_f1}")
    if why:
        reasons.append("edges")
    if std < args.min_std:
        reasons.append("blank")
        why.append(f"near-uniform (grey-level std {std:.1f} < --min_std {args.min_std})")
    if duplicate_of is not None:
        reasons.append("duplicate")
        why.append(f"duplicate of {duplicate_of}")
    else:
        first_by_pixels[digest] = rel
        kept_hashes.append((phash, rel))
    return {
        "row": index,
        "image": rel,
        "edge_f1": round(edges.f1, 4),
        "edge_precision": round(edges.precision, 4),
        "edge_recall": round(edges.recall, 4),
        "layout_recall": None if layout_recall is None else round(layout_recall, 4),
        "std": round(std, 2),
        "phash": f"{phash:048x}",
        "nearest_hash_distance": nearest_distance,
        "duplicate_of": duplicate_of,
        "reasons": reasons,
        "why": why,
        "kept": not reasons,
    }


def summary_of(scores: list[dict], args: argparse.Namespace) -> dict:
    f1 = np.array([s["edge_f1"] for s in scores])
    recall = np.array([s["layout_recall"] for s in scores if s["layout_recall"] is not None])
    return {
        "rows": len(scores),
        "kept": sum(s["kept"] for s in scores),
        "dropped_edges": sum("edges" in s["reasons"] for s in scores),
        "dropped_blank": sum("blank" in s["reasons"] for s in scores),
        "dropped_duplicate": sum("duplicate" in s["reasons"] for s in scores),
        "edge_f1_quantiles": {f"p{q}": round(float(np.percentile(f1, q)), 4) for q in (0, 10, 25, 50, 75, 90, 100)},
        "layout_recall_quantiles": {
            f"p{q}": round(float(np.percentile(recall, q)), 4) for q in (0, 10, 25, 50, 75, 90, 100)
        }
        if recall.size
        else None,
        "settings": {
            k: getattr(args, k)
            for k in ("layout", "min_layout_recall", "min_edge_f1", "tolerance", "min_std", "max_hash_distance")
        },
    }


def report_markdown(summary: dict, scores: list[dict]) -> str:
    s = summary
    settings = ", ".join(f"`--{key} {value}`" for key, value in s["settings"].items() if value is not None)
    out = ["# Dataset filter report", "", f"Settings: {settings}.", ""]
    out += ["| rows | kept | edges (layout lines / F1) | blank | duplicate |", "|---|---|---|---|---|"]
    out += [
        f"| {s['rows']} | {s['kept']} | {s['dropped_edges']} | {s['dropped_blank']} | {s['dropped_duplicate']} |",
        "",
    ]
    for key, title in (("layout_recall_quantiles", "Share of the layout's lines with an image edge (pick "
                        "`--min_layout_recall` from this)"), ("edge_f1_quantiles", "Edge F1 with the whole layout "
                        "template (`--min_edge_f1`)")):  # fmt: skip
        if s[key]:
            out += [f"{title}:", "", "| " + " | ".join(s[key]) + " |", "|" + "---|" * len(s[key])]
            out += ["| " + " | ".join(f"{v:.3f}" for v in s[key].values()) + " |", ""]
    dropped = [score for score in scores if not score["kept"]]
    out += ["## Dropped rows", "", "| row | image | layout lines | edge F1 | std | why |", "|---|---|---|---|---|---|"]
    out += [
        f"| {d['row']} | {d['image']} | {'-' if d['layout_recall'] is None else format(d['layout_recall'], '.2f')} "
        f"| {d['edge_f1']:.3f} | {d['std']:.1f} | {'; '.join(d['why'])} |"
        for d in dropped
    ]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    dataset_dir = Path(args.dataset_dir)
    output_jsonl = Path(args.output_jsonl or dataset_dir / "train.filtered.jsonl")
    if output_jsonl.resolve() == (dataset_dir / "train.jsonl").resolve():
        raise SkingenError(
            f"--output_jsonl {output_jsonl}: that is the input; the filter never overwrites train.jsonl, pick another name"
        )
    rows = read_rows(dataset_dir)
    if not rows:
        raise SkingenError(f"{dataset_dir / 'train.jsonl'}: no rows to filter")
    scores = score_rows(rows, dataset_dir, args)
    summary = summary_of(scores, args)
    report_dir = Path(args.report_dir or dataset_dir)
    atomic_write_json(report_dir / "filter_report.json", {"summary": summary, "rows": scores})
    atomic_write_text(report_dir / "filter_report.md", report_markdown(summary, scores))
    write_jsonl(output_jsonl, [row for row, score in zip(rows, scores) if score["kept"]])
    print(
        f"kept {summary['kept']} of {summary['rows']} rows (low edge F1 {summary['dropped_edges']}, blank {summary['dropped_blank']}, "
        f"duplicate {summary['dropped_duplicate']}); edge F1 median {summary['edge_f1_quantiles']['p50']:.3f}"
    )
    print(f"wrote {output_jsonl} and {report_dir / 'filter_report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
