#!/usr/bin/env python3
"""Benchmark a GRPO step (train_controlnet_grpo.py) by phase: sampling the rollouts (SDE, no gradients), decoding and
scoring them (rewards), and the update (per inner epoch: forward + backward of every trained step, plus the starting
ControlNet's forward for the KL). Also counts the transformer passes a step costs, against a supervised step's one.

    python bench/grpo_step.py --threads 1                         # tiny SD3 and FLUX at 64 px, CPU
    python bench/grpo_step.py --reward edge_f1,ocr_ned --resolution 128

Runs the trainer's own functions (skingen.train.grpo.trainer) on tiny random-weight pipelines built offline; each family in
a fresh process. The first step is a warm-up and is not counted; the median of the rest is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["sd3", "flux"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--controls", type=int, default=2, help="controls per step (--train_batch_size)")
    parser.add_argument("--group", type=int, default=4, help="--num_image_per_prompt")
    parser.add_argument("--train_sampling_steps", type=int, default=4)
    parser.add_argument("--timestep_fraction", type=float, default=1.0)
    parser.add_argument("--num_inner_epochs", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--reward", default="edge_f1")
    parser.add_argument("--steps", type=int, default=4, help="steps timed (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one family in this process
    return parser.parse_args(argv)


def make_dataset(root: Path, resolution: int, rows: int) -> None:
    from PIL import Image, ImageDraw

    from skingen.fileio import write_jsonl

    (root / "images").mkdir(parents=True)
    (root / "conditioning_images").mkdir()
    records = []
    for i in range(rows):
        image = Image.new("RGB", (resolution, resolution), (30 * i % 255, 120, 200))
        control = Image.new("RGB", (resolution, resolution))
        box = (resolution // 8 + i, resolution // 5, resolution * 3 // 4, resolution // 2)
        ImageDraw.Draw(image).rectangle(box, fill="white")
        ImageDraw.Draw(control).rectangle(box, outline="white")
        image.save(root / "images" / f"{i}.png")
        control.save(root / "conditioning_images" / f"{i}.png")
        records.append({"text": f'skin {i} writing "OK"', "image": f"images/{i}.png",
                        "conditioning_image": f"conditioning_images/{i}.png",
                        "box": [[[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]]]})
    write_jsonl(root / "train.jsonl", records)


def measure(args, family: str) -> dict:
    import torch
    from accelerate import Accelerator

    from skingen.testing.tiny_models import build_tiny_pipeline
    from skingen.train.batches import GlobalBatchSampler, batch_to_device, collate_samples, sample_seed
    from skingen.train.grpo.objective import group_advantages
    from skingen.train.grpo.trainer import prepare, reward_inputs, sample_images, set_up_grpo, update

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="grpo_bench_"))
    build_tiny_pipeline(family, work / "base", seed=0, controlnet=True)
    make_dataset(work / "data", args.resolution, args.controls * (args.steps + 1))
    script = __import__("importlib").import_module("train_controlnet_grpo")
    options = script.parse_args([
        "--pretrained_model_name_or_path", str(work / "base"), "--controlnet_model_name_or_path",
        str(work / "base" / "controlnet"), "--train_data_dir", str(work / "data"), "--output_dir", str(work / "out"),
        "--resolution", str(args.resolution), "--train_batch_size", str(args.controls), "--num_image_per_prompt",
        str(args.group), "--train_sampling_steps", str(args.train_sampling_steps),
        "--timestep_fraction", str(args.timestep_fraction), "--num_inner_epochs", str(args.num_inner_epochs),
        "--beta", str(args.beta), "--reward", args.reward, "--max_sequence_length", "32",
        "--max_train_steps", str(args.steps + 1), "--report_to", "none", "--seed", "0", "--learning_rate", "1e-4",
        *(["--ocr_backend", "none"] if "ocr" not in args.reward else [])])
    grpo = set_up_grpo(options, Accelerator())
    prepare(grpo)
    run = grpo.run
    sampler = GlobalBatchSampler(len(run.samples), args.controls, 1, 0, 0, 0, args.steps + 1)
    phases: dict[str, list[float]] = {"sampling": [], "rewards": [], "update": [], "step": []}
    for items in sampler:
        start = time.perf_counter()
        batch = batch_to_device(collate_samples([run.samples.sample(row, seed) for row, seed in items]), run.device)
        seeds = [sample_seed(seed, 0, k) for _, seed in items for k in range(args.group)]
        unwrapped = run.accelerator.unwrap_model(run.controlnet)
        trajectories, prompts, control, images = sample_images(
            grpo, batch, seeds, group=args.group, steps=args.train_sampling_steps, noise_level=0.7,
            controlnet=unwrapped)
        sampled = time.perf_counter()
        scores = grpo.rewards.score(images, reward_inputs(batch, args.group))
        total = torch.tensor(grpo.rewards.total(scores), dtype=torch.float32)
        scored = time.perf_counter()
        from skingen.train.grpo.trainer import Rollouts

        rollouts = Rollouts(trajectories, prompts, control, scores, group_advantages(total, args.group))
        for _ in range(args.num_inner_epochs):
            update(grpo, rollouts)
        done = time.perf_counter()
        for name, value in (("sampling", sampled - start), ("rewards", scored - sampled),
                            ("update", (done - scored) / args.num_inner_epochs), ("step", done - start)):
            phases[name].append(value)
    return {name: statistics.median(values[1:]) for name, values in phases.items()}


def passes(args) -> dict:
    """Transformer passes of one step, in images (each pass: ControlNet + denoiser on one image)."""
    images = args.controls * args.group
    trained = int(args.train_sampling_steps * args.timestep_fraction)
    return {"images": images, "sampling_forwards": images * args.train_sampling_steps,
            "update_forward_backward": images * trained * args.num_inner_epochs,
            "reference_forwards": images * trained * args.num_inner_epochs * (args.beta > 0)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": str(args.threads)}
    counts = passes(args)
    trained = int(args.train_sampling_steps * args.timestep_fraction)
    print(f"{args.controls} controls x {args.group} images, {args.train_sampling_steps} SDE steps ({trained} trained), "
          f"{args.num_inner_epochs} inner epochs, beta {args.beta}, reward {args.reward}, {args.resolution} px, "
          f"{args.threads} thread(s)")
    print(f"passes per step: {counts}")
    print("| family | sampling s | decode + rewards s | update s (per inner epoch) | step s |")
    print("|---|---|---|---|---|")
    for family in args.families:
        command = [sys.executable, __file__, "--one", family, *(argv if argv is not None else sys.argv[1:])]
        finished = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        if finished.returncode:
            raise SystemExit(finished.stderr[-3000:])
        result = json.loads(finished.stdout.strip().splitlines()[-1])
        print(f"| {family} | {result['sampling']:.2f} | {result['rewards']:.2f} | {result['update']:.2f} | "
              f"{result['step']:.2f} |")


if __name__ == "__main__":
    main()
