#!/usr/bin/env python3
"""GRPO's effect on held-out rewards, on the tiny flow pipelines (docs/grpo.md's evidence table and curves).

Per family and seed: a supervised ControlNet (train_controlnet_<family>.py, a new ControlNet from the tiny random
transformer) on a 64 px fill50k set (circle outlines as controls), then GRPO from it (train_controlnet_grpo.py,
reward edge_f1). The held-out controls (never trained on, by either stage) are sampled with the ODE sampler at fixed
seeds before GRPO (= the supervised ControlNet) and after it; the table has both and the per-seed change, the
curves the training rewards per step.

    python scripts/grpo_evidence.py --out outputs/grpo_evidence --families sd3 flux --seeds 0 1 2

Every stage's output is kept; a rerun skips the finished ones. Writes OUT/evidence.json, OUT/evidence.md and
OUT/reward_curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from skingen.config import parse_args_with_config  # noqa: E402
from skingen.errors import run_cli  # noqa: E402
from skingen.fileio import atomic_save_image, atomic_write_json, atomic_write_text, read_jsonl, write_jsonl  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"
# Prompt tokens per caption (fill50k's captions fit 32; Qwen-Image's prompt template alone takes 34).
SEQUENCE_LENGTH = {"sd3": 32, "flux": 32, "zimage": 64, "qwenimage": 64}
# GRPO on the tiny pipelines. Reward edge F1 only: the tiny random base cannot render readable text, so an OCR reward
# would be 0 for every image and move nothing. Sizes cut to fit a 2-core CPU: 2 controls x 4 images per step, 4 SDE
# steps while training and 8 ODE steps for the held-out rewards (Flow-GRPO: 10 and 40). Clip range and KL weight are
# Flow-GRPO's OCR setting; 2 inner epochs so that the second update is off-policy and the clip acts.
GRPO_FLAGS = ["--train_batch_size", "2", "--num_image_per_prompt", "4", "--train_sampling_steps", "4",
              "--timestep_fraction", "1.0", "--noise_level", "0.7", "--clip_range", "1e-4", "--adv_clip_max", "5",
              "--beta", "0.04", "--num_inner_epochs", "2", "--reward", "edge_f1=1", "--ocr_backend", "none",
              "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
              "--validation_split", "validation", "--validation_inference_steps", "8", "--num_validation_images", "2",
              "--report_to", "tensorboard"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/grpo_evidence")
    parser.add_argument("--families", nargs="+", default=["sd3", "flux"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=48, help="training rows (controls)")
    parser.add_argument("--held_out", type=int, default=8, help="held-out controls")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--supervised_steps", type=int, default=300)
    parser.add_argument("--grpo_steps", type=int, default=30)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="GRPO's learning rate")
    parser.add_argument("--grpo_args", default="", help="extra flags for train_controlnet_grpo.py")
    return parse_args_with_config(parser, argv)


def run(command: list[str], log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    with log.open("w", encoding="utf-8") as handle:
        finished = subprocess.run([sys.executable, *command], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if finished.returncode:
        raise SystemExit(f"{command[0]} failed; see {log}")


def make_data(args, out: Path) -> Path:
    data = out / "fill50k"
    if not (data / "validation.jsonl").is_file():
        run(["scripts/make_fill50k.py", "--out", str(data), "--n", str(args.rows + args.held_out),
             "--resolution", str(args.resolution), "--seed", "0"], out / "fill50k.log")
        rows = list(read_jsonl(data / "train.jsonl"))
        write_jsonl(data / "validation.jsonl", [row for _, row in rows[args.rows:]])
        write_jsonl(data / "train.jsonl", [row for _, row in rows[:args.rows]])
    return data


def make_base(family: str, out: Path) -> Path:
    base = out / f"tiny_{family}"
    if not (base / "model_index.json").is_file():
        run(["scripts/make_tiny_pipeline.py", "--backbone", family, "--out", str(base)], out / f"tiny_{family}.log")
    return base


def supervised(args, family: str, seed: int, base: Path, data: Path, out: Path) -> Path:
    folder = out / f"{family}_seed{seed}" / "supervised"
    if not (folder / WEIGHTS).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        run([f"train_controlnet_{family}.py", "--pretrained_model_name_or_path", str(base), "--train_data_dir",
             str(data), "--output_dir", str(folder), "--resolution", str(args.resolution), "--train_batch_size", "4",
             "--max_train_steps", str(args.supervised_steps), "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
             "--max_sequence_length", str(SEQUENCE_LENGTH[family]), "--seed", str(seed), "--report_to", "none",
             "--checkpointing_steps", str(args.supervised_steps)], folder.parent / "supervised.log")
    return folder


def grpo(args, family: str, seed: int, base: Path, data: Path, start: Path, out: Path) -> dict:
    folder = out / f"{family}_seed{seed}" / "grpo"
    if not (folder / WEIGHTS).is_file():
        run(["train_controlnet_grpo.py", *GRPO_FLAGS, "--learning_rate", str(args.learning_rate),
             "--max_sequence_length", str(SEQUENCE_LENGTH[family]),
             "--pretrained_model_name_or_path", str(base), "--controlnet_model_name_or_path", str(start),
             "--train_data_dir", str(data), "--output_dir", str(folder), "--resolution", str(args.resolution),
             "--max_train_steps", str(args.grpo_steps), "--validation_steps", str(args.grpo_steps),
             "--checkpointing_steps", str(args.grpo_steps), "--validation_rows", str(args.held_out),
             "--seed", str(seed), *args.grpo_args.split()], folder.parent / "grpo.log")
    return json.loads((folder / "grpo_log.json").read_text(encoding="utf-8"))


def summary(results: dict) -> dict:
    """Per family: held-out edge F1 before/after per seed, mean and spread of the change."""
    table = {}
    for family, seeds in results.items():
        rows = []
        for seed, log in sorted(seeds.items()):
            held = log["held_out"]
            first, last = held[min(held, key=int)], held[max(held, key=int)]
            rows.append({"seed": seed, "before": first["val_edge_f1"], "after": last["val_edge_f1"],
                         "change": last["val_edge_f1"] - first["val_edge_f1"]})
        changes = [row["change"] for row in rows]
        table[family] = {"seeds": rows, "mean_change": statistics.mean(changes),
                         "sd_change": statistics.stdev(changes) if len(changes) > 1 else 0.0}
    return table


def markdown(table: dict) -> str:
    lines = ["| family | seed | held-out edge F1 before (supervised) | after GRPO | change |", "|---|---|---|---|---|"]
    for family, entry in table.items():
        for row in entry["seeds"]:
            lines.append(f"| {family} | {row['seed']} | {row['before']:.4f} | {row['after']:.4f} | {row['change']:+.4f} |")
        lines.append(f"| {family} | mean (sd) | | | {entry['mean_change']:+.4f} ({entry['sd_change']:.4f}) |")
    return "\n".join(lines) + "\n"


def curves_png(results: dict, path: Path, size=(900, 320)) -> None:
    """Training reward (edge F1 mean per step) of every run, one panel per family (drawn with PIL)."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    panels = len(results)
    image = Image.new("RGB", (size[0], size[1] * panels), "white")
    draw = ImageDraw.Draw(image)
    for panel, (family, seeds) in enumerate(results.items()):
        top, left, width, height = panel * size[1] + 30, 60, size[0] - 200, size[1] - 70
        series = {seed: [(int(k), v["reward_edge_f1_mean"]) for k, v in log["steps"].items()]
                  for seed, log in seeds.items()}
        values = [v for points in series.values() for _, v in points]
        low, high = min(values), max(values)
        steps = max(k for points in series.values() for k, _ in points)
        draw.rectangle((left, top, left + width, top + height), outline="black")
        draw.text((left, top - 22), f"{family}: training reward edge_f1 (mean of the step's images) per GRPO step",
                  fill="black")
        draw.text((5, top), f"{high:.3f}", fill="black")
        draw.text((5, top + height - 10), f"{low:.3f}", fill="black")
        draw.text((left + width - 20, top + height + 5), f"{steps}", fill="black")
        for index, (seed, points) in enumerate(sorted(series.items())):
            xy = [(left + width * (k - 1) / max(steps - 1, 1), top + height * (high - v) / max(high - low, 1e-9))
                  for k, v in sorted(points)]
            draw.line(xy, fill=colours[index % len(colours)], width=2)
            draw.text((left + width + 15, top + 20 * index), f"seed {seed}", fill=colours[index % len(colours)])
    atomic_save_image(image, path)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(args, out)
    results: dict = {}
    for family in args.families:
        base = make_base(family, out)
        for seed in args.seeds:
            print(f"== {family} seed {seed}: supervised ControlNet, then GRPO", flush=True)
            start = supervised(args, family, seed, base, data, out)
            results.setdefault(family, {})[seed] = grpo(args, family, seed, base, data, start, out)
    table = summary(results)
    atomic_write_json(out / "evidence.json", {"settings": vars(args), "table": table, "logs": results})
    atomic_write_text(out / "evidence.md", markdown(table))
    curves_png(results, out / "reward_curves.png")
    print(markdown(table))


if __name__ == "__main__":
    run_cli(main)
