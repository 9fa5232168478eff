#!/usr/bin/env python3
"""Does the OCR text loss make *sampled* text on *unseen* layouts more readable? A paired, held-out A/B.

    python bench/text_loss_ab.py --family light                      # 5 seeds x 2 arms, tiny model, 128 px, CPU
    python bench/text_loss_ab.py --family dark --seeds 0 1 2 3 4
    python bench/text_loss_ab.py --dataset_dir DIR --heldout_rows 8  # any glyph dataset (rows with box + texts)
    python bench/text_loss_ab.py --family light -- --text_loss_max_timestep 400   # after --: trainer flags

The protocol:

1. **Data.** ``--dataset_dir`` (rows with ``box`` + ``texts``), or a family of ``skingen.testing.glyph_fixtures`` built
   in ``--work_dir``. The last ``--heldout_rows`` rows are held out; training rows that share a label string with
   them are dropped (counted), so every held-out control has unseen strings at unseen positions.
2. **Model.** A tiny SDXL pipeline + ControlNet whose VAE is fitted to the *training* images
   (``skingen.testing.tiny_sdxl.fit_tiny_vae``), or ``--base_model`` (a tiny base that has seen skins). The ceilings are
   printed: what ``evaluate.py``'s OCR reads in the held-out images and in their VAE reconstructions.
3. **Arms.** Per seed, the ControlNet is trained twice with identical data order, noise and timesteps:
   ``--text_loss_weight 0`` (diffusion loss only; the text loss is measured, not added) and ``W``.
4. **Score.** Each arm samples every held-out control (``--num_inference_steps`` 20, fixed seed per row, the same
   in every arm); ``skingen.evaluate.metrics.evaluate_pairs`` (what ``evaluate.py`` runs) gives sentence accuracy and NED
   of the boxes' text and the edge F1 against the control. Beside them: the trainer's fixed-timestep curves
   (``--validation_loss_timesteps``, on the training rows): ``val_loss_diffusion`` and ``val_text_ctc``, late means.
5. **Summary.** A table per seed, the paired differences (W minus 0) with mean and sd over seeds, and how many
   seeds moved each way. ``--json`` keeps everything.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METRICS = ("sentence_accuracy", "ned", "edge_f1", "val_loss_diffusion", "val_text_ctc")


# ---------------------------------------------------------------------------------------------------------------
# 1. Data: the held-out split


class Split(NamedTuple):  # a NamedTuple: dataclasses need the module in sys.modules, tests load it bare
    train_dir: Path
    heldout_dir: Path
    train_rows: int
    heldout_rows: int
    dropped_rows: int  # training rows left out because they share a string with a held-out row


def read_dataset_rows(dataset_dir: Path) -> list[dict]:
    """The rows of ``dataset_dir/train.jsonl`` (paths relative to the folder); each must have ``box`` + ``texts``."""
    from skingen.errors import SkingenError

    path = dataset_dir / "train.jsonl"
    if not path.is_file():
        raise SkingenError(f"{path}: not found; --dataset_dir needs a glyph dataset folder with train.jsonl")
    rows = []
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SkingenError(f"{path}:{index}: invalid JSON ({err.msg})") from None
        if not row.get("box") or not row.get("texts") or len(row["box"]) != len(row["texts"]):
            raise SkingenError(f"{path}:{index}: the row needs aligned \"box\" + \"texts\"; the text-loss protocol "
                               "needs glyph rows (render_glyphs.py --mode glyph writes them)")
        rows.append(row)
    return rows


def split_dataset(dataset_dir: Path, out_dir: Path, heldout_rows: int) -> Split:
    """Write ``out_dir/train`` and ``out_dir/heldout`` (``train.jsonl`` + copies of the files): the last
    ``heldout_rows`` rows are held out; earlier rows sharing any label string with them are dropped."""
    from skingen.errors import SkingenError

    rows = read_dataset_rows(dataset_dir)
    if not 0 < heldout_rows < len(rows):
        raise SkingenError(f"--heldout_rows {heldout_rows}: the dataset has {len(rows)} rows; hold out 1 .. "
                           f"{len(rows) - 1}")
    heldout, train = rows[-heldout_rows:], rows[:-heldout_rows]
    heldout_strings = {text for row in heldout for text in row["texts"]}
    kept = [row for row in train if not heldout_strings & set(row["texts"])]
    if not kept:
        raise SkingenError(f"{dataset_dir}: every training row shares a label string with the last {heldout_rows} "
                           "rows; hold out rows whose strings do not occur earlier")
    for name, part in (("train", kept), ("heldout", heldout)):
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for row in part:
            for key in ("image", "conditioning_image"):
                copy = folder / row[key]  # a copy: the trainer refuses links that leave its dataset folder
                if not copy.exists():
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(dataset_dir / row[key], copy)
        (folder / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part),
                                            encoding="utf-8")
    return Split(out_dir / "train", out_dir / "heldout", len(kept), len(heldout), len(train) - len(kept))


def add_position_channel(split_dir: Path) -> None:
    """AnyText's position input in the control: every text box filled with (0, 0, 96) under the white glyphs, so the
    control says where text goes as well as what it looks like. Rewrites the split's control images."""
    import numpy as np
    from PIL import Image, ImageDraw

    for line in (split_dir / "train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        path = split_dir / row["conditioning_image"]
        control = Image.open(path).convert("RGB")
        mask = Image.new("L", control.size, 0)
        for quad in row["box"]:
            ImageDraw.Draw(mask).polygon([tuple(point) for point in quad], fill=96)
        pixels = np.array(control)
        pixels[..., 2] = np.maximum(pixels[..., 2], np.asarray(mask))
        Image.fromarray(pixels).save(path)


# ---------------------------------------------------------------------------------------------------------------
# 2. Model and ceilings


def build_fitted_pipeline(out_dir: Path, train_dir: Path, *, resolution: int, vae_fit_steps: int, seed: int = 0,
                          backbone: str = "sdxl") -> dict:
    """A tiny pipeline of ``backbone`` (+ ControlNet) whose VAE is fitted to the training images only (SD3/FLUX:
    also its shift_factor, so the 16-channel latents are centred as the real ones)."""
    from PIL import Image

    from skingen.testing.tiny_models import build_tiny_pipeline, fit_latent_shift
    from skingen.testing.tiny_sdxl import fit_tiny_vae
    from skingen.train.batches import training_pixels

    rows = read_dataset_rows(train_dir)
    images = [training_pixels(Image.open(train_dir / row["image"]).convert("RGB"), resolution)[0] for row in rows]
    build_tiny_pipeline(backbone, out_dir, seed=seed, controlnet=True)
    fit = fit_tiny_vae(out_dir, images, steps=vae_fit_steps, seed=seed)
    return fit | (fit_latent_shift(out_dir, images) if backbone != "sdxl" else {})


@functools.cache
def ocr_engine():
    from skingen.prep.ocr import get_ocr

    return get_ocr("rapidocr")


def score_images(heldout_dir: Path, images_dir: Path) -> dict:
    """evaluate.py's metrics of the images in ``images_dir`` (named like the held-out rows' images)."""
    from skingen.evaluate.metrics import EvalPair, evaluate_pairs, summarize

    pairs = []
    for row in read_dataset_rows(heldout_dir):
        name = Path(row["image"]).name
        pairs.append(EvalPair(id=name, output=str(images_dir / name), control=str(heldout_dir / row["conditioning_image"]),
                              prompt=row.get("text", ""), boxes=row["box"], texts=row["texts"]))
    records = evaluate_pairs(pairs, ocr=ocr_engine())
    return summarize(records) | {"lines": [line for record in records for line in record["lines"]]}


def ceilings(pipeline_dir: Path, heldout_dir: Path, out_dir: Path, resolution: int) -> dict:
    """Scores of the held-out images themselves and of their VAE reconstructions: the most sampling can reach."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from skingen.testing.vae_fitting import vae_round_trip
    from skingen.train.batches import tensor_to_image, training_pixels

    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae")
    originals, reconstructions = out_dir / "originals", out_dir / "reconstructions"
    for row in read_dataset_rows(heldout_dir):
        name = Path(row["image"]).name
        for folder in (originals, reconstructions):
            folder.mkdir(parents=True, exist_ok=True)
        pixels = training_pixels(Image.open(heldout_dir / row["image"]).convert("RGB"), resolution)[0]
        decoded = vae_round_trip(vae, pixels[None])[0]
        for folder, image in ((originals, pixels), (reconstructions, decoded)):
            tensor_to_image(image).save(folder / name)
    return {"images": _flat(score_images(heldout_dir, originals)),
            "reconstructions": _flat(score_images(heldout_dir, reconstructions))}


def _flat(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key != "lines"}


# ---------------------------------------------------------------------------------------------------------------
# 3./4. One arm: train, sample the held-out controls, score


@functools.cache
def _trainer_script(backbone: str = "sdxl"):
    """train_controlnet_sdxl_ctc.py, or train_controlnet_sd3.py / _flux.py (the same text-loss flags)."""
    import importlib.util

    name = "train_controlnet_sdxl_ctc" if backbone == "sdxl" else f"train_controlnet_{backbone}"
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def train_arm(pipeline_dir: Path, train_dir: Path, output_dir: Path, *, seed: int, text_loss_weight: float,
              args: argparse.Namespace) -> dict:
    """One training run of train_controlnet_sdxl_ctc.py in this process; its fixed-timestep validation curve."""
    from skingen.train.loop import train

    script = _trainer_script(args.backbone)
    # FLUX.1-dev's guidance input: trained and sampled at the same value.
    guidance = ["--guidance_scale", str(args.guidance_scale)] if args.backbone == "flux" else []
    argv = [
        "--pretrained_model_name_or_path", str(pipeline_dir), "--train_data_dir", str(train_dir),
        "--output_dir", str(output_dir), "--resolution", str(args.resolution), "--train_batch_size", "2",
        "--learning_rate", str(args.learning_rate), "--lr_warmup_steps", "0", "--seed", str(seed),
        "--report_to", "none", "--max_train_steps", str(args.max_train_steps),
        "--validation_steps", str(args.validation_steps), "--checkpointing_steps", str(args.max_train_steps + 1),
        "--validation_loss_rows", str(args.validation_loss_rows),
        "--validation_loss_timesteps", *map(str, args.eval_timesteps), "--text_loss_weight", str(text_loss_weight),
        *guidance, *args.trainer_flags,
    ]
    script_args = script.parse_args(argv)
    started = time.perf_counter()
    result = train(script_args)
    _reset_accelerate_state()
    return {"train_seconds": time.perf_counter() - started, "curve": result.validation_losses}


def sample_heldout(pipeline_dir: Path, controlnet_dir: Path, heldout_dir: Path, images_dir: Path,
                   args: argparse.Namespace) -> float:
    """Sample every held-out control once (seed = row index, the same in every arm); returns the seconds taken."""
    from skingen.generate.jobs import GenerationRow, ImageJob, SamplingSettings
    from skingen.generate.pipeline import generate_batch, load_controlnet_pipeline

    started = time.perf_counter()
    pipeline = load_controlnet_pipeline(pipeline_dir, [controlnet_dir])  # the family's sampler: UniPC for SDXL
    settings = SamplingSettings(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    rows = read_dataset_rows(heldout_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(rows), 4):
        chunk = rows[start:start + 4]
        jobs = [ImageJob(GenerationRow(row_id=str(start + k), prompt=row.get("text", ""),
                                       control_images=(str(heldout_dir / row["conditioning_image"]),), where=f"held-out row {start + k}"),
                         seed=start + k, height=args.resolution, width=args.resolution)
                for k, row in enumerate(chunk)]
        for row, image in zip(chunk, generate_batch(pipeline, jobs, settings)):
            image.save(images_dir / Path(row["image"]).name)
    return time.perf_counter() - started


def late_mean(curve: dict, key: str) -> float:
    """Mean of ``key`` over the evaluations in the second half of training (less noisy than the last one)."""
    end = max(curve)
    values = [v[key] for step, v in curve.items() if step > end / 2 and key in v]
    return statistics.mean(values) if values else float("nan")


def run_arm(pipeline_dir: Path, split: Split, out_dir: Path, *, seed: int, weight: float,
            args: argparse.Namespace) -> dict:
    """Train, sample and score one arm; cached in ``out_dir/arm.json`` so an interrupted run resumes."""
    record_path = out_dir / "arm.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        return record | {"curve": {int(step): values for step, values in record["curve"].items()}}
    trained = train_arm(pipeline_dir, split.train_dir, out_dir, seed=seed, text_loss_weight=weight, args=args)
    sample_seconds = sample_heldout(pipeline_dir, out_dir, split.heldout_dir, out_dir / "heldout_samples", args)
    scores = score_images(split.heldout_dir, out_dir / "heldout_samples")
    curve = {int(k): v for k, v in trained["curve"].items()}
    record = {
        "seed": seed, "weight": weight, "train_seconds": trained["train_seconds"], "sample_seconds": sample_seconds,
        "sentence_accuracy": scores["sentence_accuracy"], "ned": scores["ned"], "edge_f1": scores["edge_f1"],
        "val_loss_diffusion": late_mean(curve, "val_loss_diffusion"), "val_text_ctc": late_mean(curve, "val_text_ctc"),
        "readings": [(line["target"], line["predicted"]) for line in scores["lines"]], "curve": curve,
    }
    from skingen.fileio import atomic_write_json

    atomic_write_json(record_path, record)
    return record


def _reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---------------------------------------------------------------------------------------------------------------
# 5. Summary


def paired_summary(records: dict, seeds: list[int], weight: float) -> dict:
    """Per metric: the paired differences (weight W minus weight 0) per seed, their mean and sd, seeds up/down."""
    summary = {}
    for metric in METRICS:
        diffs = [records[(s, weight)][metric] - records[(s, 0.0)][metric] for s in seeds]
        base = [records[(s, 0.0)][metric] for s in seeds]
        summary[metric] = {
            "weight0_mean": statistics.mean(base), "weight0_sd": _sd(base),
            "arm_mean": statistics.mean(records[(s, weight)][metric] for s in seeds),
            "arm_sd": _sd([records[(s, weight)][metric] for s in seeds]),
            "diff_mean": statistics.mean(diffs), "diff_sd": _sd(diffs),
            "relative_diff": statistics.mean(diffs) / statistics.mean(base) if statistics.mean(base) else float("nan"),
            "up": sum(d > 0 for d in diffs), "down": sum(d < 0 for d in diffs), "diffs": diffs,
        }
    return summary


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def summary_markdown(records: dict, seeds: list[int], weight: float, title: str) -> str:
    w = f"w={weight:g}"
    rows = [f"### {title}", "",
            f"| seed | sentence acc, w=0 | {w} | NED, w=0 | {w} | edge F1, w=0 | {w} "
            f"| val_loss_diffusion, w=0 | {w} | val_text_ctc, w=0 | {w} |",
            "|---|" + "---|" * 10]
    for seed in seeds:
        zero, text = records[(seed, 0.0)], records[(seed, weight)]
        cells = [f"{zero[m]:.3f} | {text[m]:.3f}" if m in ("sentence_accuracy", "ned", "edge_f1")
                 else f"{zero[m]:.4f} | {text[m]:.4f}" for m in METRICS]
        rows.append(f"| {seed} | " + " | ".join(cells) + " |")
    summary = paired_summary(records, seeds, weight)
    cells = [f"{s['weight0_mean']:.3f} +- {s['weight0_sd']:.3f} | {s['arm_mean']:.3f} +- {s['arm_sd']:.3f}"
             for s in summary.values()]
    rows.append("| mean +- sd | " + " | ".join(cells) + " |")
    cells = [f" | {s['diff_mean']:+.4f} +- {s['diff_sd']:.4f} ({s['up']} up, {s['down']} down)" for s in summary.values()]
    rows.append("| paired difference (w - 0), in the w column | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--dataset_dir", type=Path, default=None, help="A glyph dataset folder (rows with box + texts).")
    data.add_argument("--family", choices=("light", "dark"), default="light",
                      help="Build this skingen.testing.glyph_fixtures family in --work_dir (when no --dataset_dir).")
    parser.add_argument("--rows", type=int, default=24, help="Rows of the built family (held-out rows included).")
    parser.add_argument("--heldout_rows", type=int, default=8, help="The last rows, held out (unseen controls).")
    parser.add_argument("--position_channel", action="store_true",
                        help="Add AnyText's position input to every control: text boxes filled in the blue channel.")
    parser.add_argument("--base_model", type=Path, default=None,
                        help="A tiny SDXL pipeline folder (e.g. a pre-trained tiny base) instead of a fresh one with "
                             "a fitted VAE; it must hold a controlnet/ or the ControlNet is made from its UNet.")
    parser.add_argument("--backbone", choices=("sdxl", "sd3", "flux"), default="sdxl",
                        help="Model family of the tiny pipeline and trainer (sd3/flux: train_controlnet_sd3.py / "
                             "_flux.py; their timesteps are sigma x 1000).")
    parser.add_argument("--work_dir", type=Path, default=Path("bench_text_loss_ab"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--text_loss_weight", type=float, default=0.01,
                        help="The arm compared with weight 0 (default: the trainer's default).")
    parser.add_argument("--max_train_steps", type=int, default=150)
    parser.add_argument("--validation_steps", type=int, default=50)
    parser.add_argument("--validation_loss_rows", type=int, default=4)
    parser.add_argument("--eval_timesteps", type=int, nargs="+", default=[50, 150, 250],
                        help="The fixed timesteps of the trainer's validation loss (--validation_loss_timesteps).")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--vae_fit_steps", type=int, default=400)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=1.0,
                        help="1: no classifier-free guidance (the tiny text encoders are random).")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="Also write every record and the summary here.")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER,
                        help="After --: flags for train_controlnet_sdxl_ctc.py (e.g. --text_loss_max_timestep 400).")
    args = parser.parse_args(argv)
    args.trainer_flags = [f for f in args.trainer_flags if f != "--"]
    return args


def prepare(args: argparse.Namespace) -> tuple[Split, Path]:
    """The split and the pipeline, built once per --work_dir (the arms reuse them)."""
    from skingen.testing.glyph_fixtures import write_glyph_family

    dataset_dir = args.dataset_dir
    if dataset_dir is None:
        dataset_dir = args.work_dir / f"dataset_{args.family}"
        if not (dataset_dir / "train.jsonl").is_file():
            write_glyph_family(dataset_dir, args.family, rows=args.rows, heldout_rows=args.heldout_rows,
                               resolution=args.resolution)
    split_dir = args.work_dir / ("split_position" if args.position_channel else "split")
    split = split_dataset(dataset_dir, split_dir, args.heldout_rows)
    if args.position_channel and not (split_dir / "position_channel_added").is_file():
        add_position_channel(split.train_dir)
        add_position_channel(split.heldout_dir)
        (split_dir / "position_channel_added").write_text("1\n")
    print(f"data: {split.train_rows} training rows, {split.heldout_rows} held-out rows "
          f"({split.dropped_rows} training rows dropped: they share a string with a held-out row)")
    if args.base_model is not None:
        return split, args.base_model
    pipeline_dir = args.work_dir / ("pipeline" if args.backbone == "sdxl" else f"pipeline_{args.backbone}")
    if not (pipeline_dir / "model_index.json").is_file():
        started = time.perf_counter()
        fit = build_fitted_pipeline(pipeline_dir, split.train_dir, resolution=args.resolution,
                                    vae_fit_steps=args.vae_fit_steps, backbone=args.backbone)
        print(f"VAE fitted to the training images in {time.perf_counter() - started:.0f} s: "
              f"L1 {fit['initial_l1']:.3f} -> {fit['final_l1']:.3f}")
    return split, pipeline_dir


def arms_folder(args: argparse.Namespace) -> str:
    """Where a setting's arms are kept (and found again when the run resumes): one folder per setting."""
    flags = "_".join(args.trainer_flags).replace("--", "").replace(" ", "") or "default"
    return (f"arms_{args.max_train_steps}steps_lr{args.learning_rate:g}_{flags}"
            + ("_position" if args.position_channel else "") + ("_base" if args.base_model else "")
            + ("" if args.backbone == "sdxl" else f"_{args.backbone}"))


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split, pipeline_dir = prepare(args)
    ceiling = ceilings(pipeline_dir, split.heldout_dir, args.work_dir / "ceilings", args.resolution)
    for name, scores in ceiling.items():
        print(f"ceiling, held-out {name}: sentence accuracy {scores['sentence_accuracy']:.3f}, NED {scores['ned']:.3f} "
              f"({scores['text_lines']} lines)")
    records = {}
    for seed in args.seeds:
        for weight in (0.0, args.text_loss_weight):
            out = args.work_dir / arms_folder(args) / f"seed{seed}_w{weight:g}"
            record = run_arm(pipeline_dir, split, out, seed=seed, weight=weight, args=args)
            records[(seed, weight)] = record
            print(f"seed {seed} weight {weight:g} (train {record['train_seconds']:.0f} s, sample "
                  f"{record['sample_seconds']:.0f} s): " + ", ".join(f"{m} {record[m]:.4f}" for m in METRICS), flush=True)
    title = (f"{args.dataset_dir or 'family ' + args.family}, {split.train_rows} training / {split.heldout_rows} "
             f"held-out rows, {args.max_train_steps} steps, weight {args.text_loss_weight:g}, trainer flags "
             f"{args.trainer_flags or 'default'}{', position channel' if args.position_channel else ''}")
    print()
    print(summary_markdown(records, args.seeds, args.text_loss_weight, title))
    result = {"title": title, "ceiling": ceiling, "summary": paired_summary(records, args.seeds, args.text_loss_weight),
              "records": {f"seed{s}_w{w:g}": r for (s, w), r in records.items()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    return result


if __name__ == "__main__":
    from skingen.errors import run_cli

    run_cli(main)
