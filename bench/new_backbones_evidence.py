"""Does a Z-Image / Qwen-Image ControlNet trained by skingen learn its controls? Tiny pipelines, 3 seeds, CPU.

    OMP_NUM_THREADS=1 python bench/new_backbones_evidence.py --out new_backbones.json   # ~15 min on one CPU core

Per family and seed: a tiny random-weight pipeline (scripts/make_tiny_pipeline.py's builder, that seed), a layout
dataset drawn from the seed (filled key rectangles on a background; the control is their outlines, as a Canny
control), 32 training rows and 8 held-out rows at 64 px. The ControlNet trains ``--steps`` steps through the
family's trainer script; then

- the held-out flow-matching loss at fixed noise (the trainer's ``--validation_loss_timesteps`` on the
  ``validation`` split, the same noise before and after) of the trained ControlNet against the untrained one;
- edge F1 (skingen.evaluate.metrics.edge_f1) between images generated for the held-out controls by diffusers' own
  ControlNet pipeline (``from_pretrained`` of the base and of the trained folder) and those controls, against the
  untrained ControlNet with the same seeds.

The tiny base is random, its VAE too: edge F1 of decoded images measures whether the ControlNet moves the output
towards its control through a decoder that was never fitted, so it can stay flat even when the latent loss drops.
Prints a markdown table (mean and standard deviation over seeds) and writes the per-seed values as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from skingen.errors import run_cli  # noqa: E402

FAMILIES = ("zimage", "qwenimage")
SIZE = 64
TIMESTEPS = ("250", "500", "750")


def make_layouts(root: Path, seed: int, rows: int, held_out: int) -> None:
    """Random key layouts: filled rectangles (image) and their outlines (control), split into train/validation."""
    rng = random.Random(seed)
    for folder in ("images", "conditioning_images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "validation": []}
    for index in range(rows + held_out):
        background = tuple(rng.randrange(40, 120) for _ in range(3))
        image, control = Image.new("RGB", (SIZE, SIZE), background), Image.new("RGB", (SIZE, SIZE))
        for _ in range(rng.randrange(2, 5)):
            x0, y0 = rng.randrange(2, SIZE - 20), rng.randrange(2, SIZE - 16)
            box = (x0, y0, x0 + rng.randrange(10, 20), y0 + rng.randrange(8, 14))
            ImageDraw.Draw(image).rectangle(box, fill=tuple(rng.randrange(170, 256) for _ in range(3)))
            ImageDraw.Draw(control).rectangle(box, outline=(255, 255, 255))
        image.save(root / "images" / f"{index}.png")
        control.save(root / "conditioning_images" / f"{index}.png")
        split = "train" if index < rows else "validation"
        lines[split].append({"text": "a keyboard skin", "image": f"images/{index}.png",
                             "conditioning_image": f"conditioning_images/{index}.png"})
    for split, records in lines.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def train(family: str, base: Path, data: Path, out: Path, seed: int, steps: int) -> dict[int, dict[str, float]]:
    from skingen.train.loop import train as run_training

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from repo_scripts import load_script

    script = load_script(f"train_controlnet_{family}.py")
    args = script.parse_args([
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir", str(out),
        "--resolution", str(SIZE), "--train_batch_size", "4", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
        "--max_train_steps", str(steps), "--seed", str(seed), "--report_to", "none", "--max_sequence_length", "32",
        "--validation_split", "validation", "--validation_loss_timesteps", *TIMESTEPS, "--validation_loss_rows", "8",
        "--validation_steps", str(steps),
    ])  # fmt: skip
    return run_training(args).validation_losses


def generated_edge_f1(family: str, base: Path, controlnet_dir: Path, data: Path, seed: int) -> float:
    import diffusers

    from skingen.backbones import pipelines
    from skingen.evaluate.metrics import edge_f1

    family_spec = pipelines.family_named(family)
    controlnet = getattr(diffusers, family_spec.controlnet_model).from_pretrained(controlnet_dir)
    pipeline = getattr(diffusers, family_spec.controlnet_pipeline).from_pretrained(base, controlnet=controlnet)
    pipeline.set_progress_bar_config(disable=True)
    scores = []
    for index, line in enumerate((data / "validation.jsonl").read_text(encoding="utf-8").splitlines()):
        control = Image.open(data / json.loads(line)["conditioning_image"]).convert("RGB")
        image = pipeline(prompt="a keyboard skin", control_image=control, height=SIZE, width=SIZE,
                         num_inference_steps=8, generator=torch.Generator().manual_seed(seed * 100 + index),
                         **{family_spec.guidance_argument: 1.0}).images[0]
        scores.append(edge_f1(image, control))
    return statistics.fmean(scores)


def run_seed(family: str, seed: int, steps: int, work: Path) -> dict:
    from skingen.testing.tiny_models import build_tiny_pipeline

    base, data = work / f"{family}-{seed}-base", work / f"{family}-{seed}-data"
    build_tiny_pipeline(family, base, seed=seed, controlnet=True)
    make_layouts(data, seed, rows=32, held_out=8)
    start = time.perf_counter()
    losses = train(family, base, data, work / f"{family}-{seed}-run", seed, steps)
    minutes = (time.perf_counter() - start) / 60
    before, after = losses[0], losses[steps]
    key = next(k for k in before if k.startswith("val_loss"))  # the mean over the fixed timesteps
    return {"family": family, "seed": seed, "steps": steps, "train_minutes": minutes,
            "heldout_loss_untrained": before[key], "heldout_loss_trained": after[key],
            "edge_f1_untrained": generated_edge_f1(family, base, base / "controlnet", data, seed),
            "edge_f1_trained": generated_edge_f1(family, base, work / f"{family}-{seed}-run", data, seed)}


def summary(rows: Sequence[dict]) -> str:
    lines = ["| family | seeds | held-out FM loss untrained -> trained (mean ± sd) | lower in | "
             "edge F1 untrained -> trained (mean ± sd) | change per seed |", "|---|---|---|---|---|---|"]
    for family in FAMILIES:
        runs = [r for r in rows if r["family"] == family]
        if not runs:
            continue

        def ms(key, runs=runs):
            values = [r[key] for r in runs]
            return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}"

        lower = sum(r["heldout_loss_trained"] < r["heldout_loss_untrained"] for r in runs)
        changes = ", ".join(f"{r['edge_f1_trained'] - r['edge_f1_untrained']:+.3f}" for r in runs)
        lines.append(f"| {family} | {len(runs)} | {ms('heldout_loss_untrained')} -> {ms('heldout_loss_trained')} | "
                     f"{lower}/{len(runs)} | {ms('edge_f1_untrained')} -> {ms('edge_f1_trained')} | {changes} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None, help="write the per-seed values as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            for seed in args.seeds:
                rows.append(run_seed(family, seed, args.steps, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    print(summary(rows))
    if args.out:
        from skingen.fileio import atomic_write_json

        atomic_write_json(Path(args.out), rows)
    return rows


if __name__ == "__main__":
    run_cli(main)
