"""Evaluate generated skins: layout adherence (Canny-edge F1 against the control), text accuracy on the
known text boxes (OCR sentence accuracy and normalised edit distance), optional CLIP score.

    python evaluate.py --results_dir outputs/infer_ctc              # an inference.py output folder
    python evaluate.py --dataset_dir datasets/keyboard_332_512 --images_dir outputs/generated
    python evaluate.py --compare outputs/infer_ctc outputs/infer_plain   # side by side (e.g. with vs without the text loss)

Writes ``metrics.json`` (per image + summary) and ``metrics.md`` into ``--output_dir`` (default: the
results or images folder); ``--compare`` writes ``comparison.json`` and ``comparison.md``. Launched on several
processes (``accelerate launch``, ``torchrun``, ``srun``; docs/cluster.md) the images are split between them
(``--num_workers`` adds OCR workers to each) and metrics.json comes out the same; a killed run resumes from its
part files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from skingen import sharding
from skingen.config import parse_args_with_config
from skingen.data import rows
from skingen.data.dataset import enforce_rows, find_dataset_files, scan_folder
from skingen.data.images import open_rgb
from skingen.errors import SkingenError, run_cli
from skingen.evaluate.metrics import (
    ClipScorer,
    EvalPair,
    PerceptualDistance,
    SSIMDistance,
    compare_reports,
    comparison_markdown,
    evaluate_pair,
    metrics_markdown,
    summarize,
)
from skingen.evaluate.metrics import diversity as measure_diversity
from skingen.fileio import atomic_write_json, atomic_write_text, remove_stale_temp_files
from skingen.generate.results import RESULTS_FILE, read_results
from skingen.prep.ocr import BACKENDS, get_ocr

METRICS_FILE = "metrics.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("what to evaluate (one of)")
    source.add_argument("--results_dir", help=f"an inference output folder with {RESULTS_FILE}")
    source.add_argument("--dataset_dir", help="a dataset folder (train.jsonl); pair with --images_dir")
    source.add_argument(
        "--images_dir", help="generated images named like the dataset's images (same relative path or file name)"
    )
    source.add_argument(
        "--compare",
        nargs=2,
        metavar=("DIR_A", "DIR_B"),
        help="two folders to compare: their metrics.json (delete it to re-evaluate), else their results.jsonl is evaluated first",
    )
    parser.add_argument(
        "--output_dir", help="where metrics.json/md (or comparison.json/md) go; default: the evaluated folder"
    )
    parser.add_argument("--tolerance", type=int, default=2, help="edge matching tolerance in pixels")
    parser.add_argument("--low_threshold", type=int, default=50, help="Canny low threshold for the generated image")
    parser.add_argument("--high_threshold", type=int, default=80, help="Canny high threshold for the generated image")
    parser.add_argument(
        "--ocr_backend", choices=(*BACKENDS, "none"), default="rapidocr", help="'none' skips the text metrics"
    )
    parser.add_argument("--clip_model", help="local folder of a transformers CLIP model; adds the CLIP score")
    parser.add_argument("--device", default="cpu", help="device for the CLIP model")
    parser.add_argument(
        "--diversity_model",
        help="local folder of a transformers CLIP/DINO/ViT model: diversity as 1 - cosine of its image embeddings "
        "(perceptual) instead of 1 - SSIM",
    )
    parser.add_argument(
        "--diversity_size", type=int, default=64, help="grey thumbnail size (px) for the 1 - SSIM diversity"
    )
    parser.add_argument(
        "--batch_size", type=int, default=16, help="images per batch (and CLIP call); each batch is kept as a part file"
    )
    parser.add_argument("--num_workers", type=int, default=1, help="worker processes for the OCR and edge metrics")
    args = parse_args_with_config(parser, argv)
    modes = [bool(args.results_dir), bool(args.dataset_dir or args.images_dir), bool(args.compare)]
    if sum(modes) != 1:
        raise SkingenError(
            "give exactly one of --results_dir, --dataset_dir with --images_dir, or --compare DIR_A DIR_B"
        )
    if bool(args.dataset_dir) != bool(args.images_dir):
        raise SkingenError(
            "--dataset_dir and --images_dir go together: the dataset gives controls and texts, the folder the generated images"
        )
    if args.tolerance < 0:
        raise SkingenError(f"--tolerance must be >= 0 pixels, got {args.tolerance}")
    if args.batch_size < 1 or args.num_workers < 1:
        raise SkingenError("--batch_size and --num_workers must be at least 1")
    return args


def _control_path(value, where: str) -> str | None:
    """A results line's conditioning image: inference.py writes absolute paths (into the dataset it read)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise SkingenError(f'{where}: "conditioning_image" must be an image path, got {value!r}')
    return value


def _box_size(row: dict, control: str | None, where: str) -> tuple[int, int] | None:
    """The (w, h) the boxes are measured in: ``box_size`` as inference.py writes it, else the control's size."""
    size = row.get("box_size")
    if size is not None:
        if not (
            isinstance(size, list)
            and len(size) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise SkingenError(f'{where}: "box_size" must be [width, height] in pixels, got {size!r}')
        return int(size[0]), int(size[1])
    if control is None:
        raise SkingenError(f'{where}: "box" needs "box_size" or a "conditioning_image" to say which pixels it is in')
    try:
        return rows.FolderImages(Path(control).parent).locate(Path(control).name, "conditioning_image").size
    except rows.FieldProblem as err:
        raise SkingenError(f"{where}: {err.problem.message}") from None


def load_results_pairs(results_dir: str) -> list[EvalPair]:
    """Pairs from an inference output folder: ``results.jsonl`` rows with ``output`` (relative to the folder),
    ``conditioning_image``, ``prompt`` and optionally ``box`` + ``texts`` (+ ``box_size``, the (w, h) the boxes
    are in; without it, the conditioning image's size). Boxes and texts follow the dataset rows' rules."""
    folder = Path(results_dir)
    listing = folder / RESULTS_FILE
    records = read_results(folder)
    outputs = rows.FolderImages(folder)
    pairs = []
    for where, row in records:
        try:
            output = outputs.locate(row.get("output"), "output")
        except rows.FieldProblem as err:
            raise SkingenError(f"{where}: {err.problem.message}") from None
        control = _control_path(row.get("conditioning_image"), where)
        prompt = row.get("prompt", "")
        box_size = _box_size(row, control, where) if row.get("box") else None
        boxes, texts = rows.check_boxes_and_texts(
            row.get("box"), row.get("texts"), prompt if isinstance(prompt, str) else None, box_size, where
        )
        pairs.append(
            EvalPair(
                id=output.rel,
                output=output.path,
                control=control,
                prompt=str(prompt),
                boxes=boxes,
                texts=texts,
                box_size=box_size if boxes else None,
                where=where,
            )
        )
    if not pairs:
        raise SkingenError(f"{listing}: no rows; nothing to evaluate (run inference.py into this folder first)")
    return pairs


def _find_generated(images_dir: Path, relative: str) -> Path | None:
    """The generated image for a dataset image: same relative path, else same file name, else same stem."""
    for candidate in (images_dir / relative, images_dir / Path(relative).name):
        if candidate.is_file():
            return candidate
    stem = Path(relative).stem
    for suffix in IMAGE_SUFFIXES:
        candidate = images_dir / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_dataset_pairs(dataset_dir: str, images_dir: str) -> list[EvalPair]:
    """Pairs from a dataset (controls, prompts, boxes, texts) and a folder of generated images named like its images.

    The dataset's rows are checked by the rows' rules (:mod:`skingen.data.rows`), as training checks them."""
    generated_dir = Path(images_dir)
    if not generated_dir.is_dir():
        raise SkingenError(f"--images_dir {generated_dir}: folder not found")
    scan = scan_folder(find_dataset_files(dataset_dir, "train"), spec=rows.EVALUATE)
    enforce_rows(scan, fix="fix or remove those rows")
    pairs, missing = [], []
    for row in scan.good:
        output = _find_generated(generated_dir, row.image.rel)
        if output is None:
            missing.append(row.image.rel)
            continue
        pairs.append(
            EvalPair(
                id=row.image.rel,
                output=str(output),
                control=row.conditioning_image.path if row.conditioning_image else None,
                prompt=row.text or "",
                boxes=row.box,
                texts=row.texts,
                box_size=row.box_size if row.box else None,
                where=row.where,
            )
        )
    if not pairs:
        raise SkingenError(
            f"--images_dir {generated_dir}: none of the {len(missing)} dataset images has a generated image there "
            "(looked for the same relative path, file name or stem)"
        )
    if missing:
        print(
            f"warning: {len(missing)} dataset rows have no generated image in {generated_dir} and are left out "
            f"(e.g. {missing[0]})",
            file=sys.stderr,
        )
    return pairs


def evaluate_folder(pairs: list[EvalPair], source: str, output_dir: Path, args: argparse.Namespace) -> dict:
    """Per-image metrics over the launched processes (and --num_workers workers each), kept as part files so a
    killed run resumes; the main process merges them in pair order, adds diversity and the summary, and writes
    metrics.json/md. Every process gets the report back."""
    needs_ocr = args.ocr_backend != "none" and any(pair.boxes for pair in pairs)
    settings = {name: getattr(args, name) for name in ("tolerance", "low_threshold", "high_threshold", "clip_model")}
    shard = sharding.shard_for(output_dir, "evaluate", {**settings, "source": source, "ocr": needs_ocr and args.ocr_backend})
    shard.group.on_main(shard.parts.prepare)
    finished = shard.parts.read()
    todo = [(position, pair) for position, pair in enumerate(pairs) if pair.id not in finished]
    clip_scorer = ClipScorer(args.clip_model, device=args.device) if args.clip_model and todo else None

    def merge(entries: dict[str, sharding.Entry]) -> dict:
        records = [entries[pair.id].fields for pair in pairs]
        measure = (
            PerceptualDistance(args.diversity_model, args.device) if args.diversity_model
            else SSIMDistance(args.diversity_size)
        )  # fmt: skip
        spread = measure_diversity(records, measure)  # needs every image: one process
        report = {
            "source": source,
            "tolerance": args.tolerance,
            "summary": summarize(records, diversity_overall=spread["overall"]),
            "diversity": spread,
            "images": records,
        }
        remove_stale_temp_files(output_dir)  # of a run killed while writing its metrics
        atomic_write_json(output_dir / METRICS_FILE, report)
        atomic_write_text(output_dir / "metrics.md", metrics_markdown(report))
        return report

    def evaluate_batch(pool: sharding.WorkerPool, batch: list[EvalPair]) -> list[sharding.Entry]:
        records = pool.map(batch)
        if clip_scorer is not None:  # batched on its device, in this process
            images = [open_rgb(pair.output, pair.where) for pair in batch]
            for record, score in zip(records, clip_scorer(images, [pair.prompt for pair in batch])):
                record["clip_score"] = score
        return [sharding.Entry(pair.id, record) for pair, record in zip(batch, records)]

    workers = args.num_workers if todo else 1
    with sharding.WorkerPool(workers, evaluate_one, PairEvaluator, (args, needs_ocr)) as pool:
        shard.run(todo, lambda batch: evaluate_batch(pool, batch), batch_size=args.batch_size, desc="evaluating")
    return shard.finish(merge)


class PairEvaluator:
    """What one worker needs to measure an image: the thresholds and an OCR engine."""

    def __init__(self, args: argparse.Namespace, needs_ocr: bool):
        self.args = args
        self.ocr = get_ocr(args.ocr_backend) if needs_ocr else None


def evaluate_one(evaluator: PairEvaluator, pair: EvalPair) -> dict:
    args = evaluator.args
    generated = open_rgb(pair.output, pair.where)
    return evaluate_pair(
        pair, generated, ocr=evaluator.ocr, tolerance=args.tolerance, low=args.low_threshold, high=args.high_threshold
    )


def load_or_evaluate(folder: str, args: argparse.Namespace) -> dict:
    """A folder's metrics.json, evaluating its results.jsonl first when there is none yet."""
    metrics_path = Path(folder) / METRICS_FILE
    if metrics_path.is_file():
        try:
            return json.loads(metrics_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise SkingenError(
                f"{metrics_path}: invalid JSON ({err.msg}); delete it to evaluate the folder again"
            ) from None
    if (Path(folder) / RESULTS_FILE).is_file():
        return evaluate_folder(load_results_pairs(folder), folder, Path(folder), args)
    raise SkingenError(
        f"--compare {folder}: neither {METRICS_FILE} nor {RESULTS_FILE} there; evaluate it first or pass a results folder"
    )


def print_summary(summary: dict, where: Path) -> None:
    numbers = ", ".join(f"{key} {value:.4f}" for key, value in summary.items() if isinstance(value, float))
    print(f"{summary['images']} images, {summary['text_lines']} text lines: {numbers or 'no metric applied'}")
    print(f"wrote {where}")


def compare_folders(dir_a: str, dir_b: str, args: argparse.Namespace) -> Path:
    """comparison.json/md of two folders (A then B, with B - A), evaluating a folder first if needed."""
    name_a, name_b = Path(dir_a).name, Path(dir_b).name
    labels = (name_a, name_b) if name_a != name_b else (dir_a, dir_b)
    comparison = compare_reports(
        load_or_evaluate(dir_a, args), load_or_evaluate(dir_b, args), *labels, sources=(dir_a, dir_b)
    )
    output_dir = Path(args.output_dir or Path(dir_a).parent / f"compare_{name_a}_vs_{name_b}")
    markdown = comparison_markdown(comparison)
    atomic_write_json(output_dir / "comparison.json", comparison)
    atomic_write_text(output_dir / "comparison.md", markdown)
    print(markdown)
    return output_dir / "comparison.md"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(f"wrote {compare_folders(*args.compare, args)}")
        return 0
    if args.results_dir:
        pairs, source = load_results_pairs(args.results_dir), args.results_dir
    else:
        pairs, source = load_dataset_pairs(args.dataset_dir, args.images_dir), f"{args.dataset_dir} + {args.images_dir}"
    output_dir = Path(args.output_dir or args.results_dir or args.images_dir)
    report = evaluate_folder(pairs, source, output_dir, args)
    if sharding.process_group().is_main:
        print_summary(report["summary"], output_dir / METRICS_FILE)
    return 0


if __name__ == "__main__":
    run_cli(main)
