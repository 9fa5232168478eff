"""Side by side: skingen's SD3 / FLUX ControlNet trainers and diffusers' reference examples, same models and data.

    python bench/vs_diffusers_flow.py --diffusers_examples /tmp/diffusers_examples --steps 30 --seeds 0 1 2

``--diffusers_examples`` is a folder holding diffusers' ``examples/controlnet/train_controlnet_sd3.py`` and
``train_controlnet_flux.py`` (e.g. ``git -C <diffusers clone> show HEAD:examples/controlnet/train_controlnet_sd3.py``);
they are run as they are, never copied into this repository.

Per backbone: one tiny pipeline (scripts/make_tiny_pipeline.py), one starting ControlNet given to both trainers
(``--controlnet_model_name_or_path``, so both start from the same weights), the same fill50k-style rows (skingen
reads train.jsonl, diffusers a parquet copy of the same images and captions) and the same flags (resolution,
batch, learning rate, weighting scheme, seed). Each trainer runs as its own process:

- time per step: read from each trainer's own "Steps" progress bar (both use tqdm): the loop's elapsed time from
  the end of the first step to the last, over the steps in between, so loading, caching, the first step's warm-up
  and saving are left out (tqdm prints whole seconds: with ``--steps`` 40 and ~0.3 s a step that is +-8 %);
- learning: the fixed-noise validation loss of the saved ControlNet on held-out rows, computed here with
  diffusers' models as diffusers' trainers compute the flow-matching step (velocity ``noise - x0`` at fixed
  sigmas, fixed noise, control latents from the VAE's mode), the same code for both ControlNets.

Writes ``WORK_DIR/results.json`` and prints a markdown table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from skingen.errors import SkingenError, run_cli  # noqa: E402
from skingen.fileio import read_jsonl  # noqa: E402
from skingen.testing.tiny_models import build_tiny_pipeline  # noqa: E402

BACKBONES = ("sd3", "flux")
EVAL_SIGMAS = (0.25, 0.5, 0.75)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--diffusers_examples", required=True, help="folder with diffusers' train_controlnet_{sd3,flux}.py"
    )
    parser.add_argument(
        "--diffusers_python",
        default=sys.executable,
        help="Python that runs diffusers' scripts (they import torchvision, which skingen does not need)",
    )
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--work_dir", default="outputs/bench_vs_diffusers_flow")
    parser.add_argument("--steps", type=int, default=30, help="training steps of the compared runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--train_rows", type=int, default=8)
    parser.add_argument("--eval_rows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads of every training process")
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error("--steps must be at least 5 (the step time is read between step 1 and the last)")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data and models


def make_data(folder: Path, rows: int, resolution: int, train_rows: int) -> tuple[Path, list[dict]]:
    """fill50k-style rows in ``folder``; its train.jsonl keeps the first ``train_rows``, all_rows.jsonl every row."""
    if not (folder / "all_rows.jsonl").is_file():
        subprocess.run([sys.executable, str(REPO / "scripts/make_fill50k.py"), "--out", str(folder), "--n", str(rows),
                        "--resolution", str(resolution), "--seed", "0"], check=True, capture_output=True)  # fmt: skip
        (folder / "train.jsonl").rename(folder / "all_rows.jsonl")
    all_rows = [row for _, row in read_jsonl(folder / "all_rows.jsonl")]
    (folder / "train.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in all_rows[:train_rows]), encoding="utf-8"
    )
    return folder, all_rows


def parquet_copy(source: Path, folder: Path, train_rows: list[dict]) -> Path:
    """The training rows as a parquet dataset with image features, which diffusers' trainers load."""
    import datasets

    theirs = folder / "diffusers_data"
    theirs.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_dict({
        "image": [str(source / row["image"]) for row in train_rows],
        "conditioning_image": [str(source / row["conditioning_image"]) for row in train_rows],
        "text": [row["text"] for row in train_rows],
    }).cast_column("image", datasets.Image()).cast_column("conditioning_image", datasets.Image())  # fmt: skip
    table.to_parquet(str(theirs / "train-00000-of-00001.parquet"))
    return theirs


def starting_controlnet(backbone: str, base: Path, out: Path) -> Path:
    """The ControlNet both trainers start from: the first transformer block(s), as skingen's default makes it."""
    import diffusers

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    if backbone == "sd3":
        transformer = diffusers.SD3Transformer2DModel.from_pretrained(base, subfolder="transformer")
        controlnet = diffusers.SD3ControlNetModel.from_transformer(
            transformer, num_layers=transformer.config.num_layers - 1, num_extra_conditioning_channels=0
        )
    else:
        transformer = diffusers.FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
        config = transformer.config
        controlnet = diffusers.FluxControlNetModel.from_transformer(
            transformer, num_layers=config.num_layers, num_single_layers=config.num_single_layers,
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
        )  # fmt: skip
    controlnet.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training runs


def training_command(trainer: str, backbone: str, args, *, base, controlnet, data, output, steps, seed) -> list[str]:
    script = (REPO if trainer == "skingen" else Path(args.diffusers_examples)) / f"train_controlnet_{backbone}.py"
    if not script.is_file():
        raise SkingenError(f"{script}: not found; --diffusers_examples must hold diffusers' {script.name}")
    data_flag = "--dataset_name" if (trainer, backbone) == ("diffusers", "flux") else "--train_data_dir"
    command = [
        sys.executable if trainer == "skingen" else args.diffusers_python, str(script), "--pretrained_model_name_or_path", str(base),
        "--controlnet_model_name_or_path", str(controlnet), data_flag, str(data), "--output_dir", str(output),
        "--resolution", str(args.resolution), "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(steps), "--learning_rate", str(args.learning_rate), "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0", "--seed", str(seed), "--mixed_precision", "no", "--report_to", "tensorboard",
        "--checkpointing_steps", "100000", "--weighting_scheme", "logit_normal", "--adam_weight_decay", "1e-2",
        "--max_grad_norm", "1.0", "--image_column", "image", "--conditioning_image_column", "conditioning_image",
        "--caption_column", "text",
    ]  # fmt: skip
    if backbone == "sd3":
        command += ["--precondition_outputs", "1", "--max_sequence_length", "77"]
    else:
        command += ["--guidance_scale", "3.5"]
        # The ControlNet comes from --controlnet_model_name_or_path; these flags would only size a new one.
        if trainer == "diffusers":
            command += ["--num_double_layers", "1", "--num_single_layers", "2"]
    return command


STEPS_BAR = re.compile(r"Steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")


def seconds_per_step(stderr: str) -> float:
    """From the trainer's tqdm "Steps" bar: (elapsed at the last step - elapsed at the first shown step >= 1) /
    the steps in between."""
    marks = {}
    for match in STEPS_BAR.finditer(stderr):
        step = int(match.group(1))
        elapsed = int(match.group(3) or 0) * 3600 + int(match.group(4)) * 60 + int(match.group(5))
        marks.setdefault(step, elapsed)  # the first time a step is shown
    first = min((step for step in marks if step >= 1), default=None)
    last = max(marks, default=None)
    if first is None or last is None or last <= first:
        raise SkingenError("no progress bar with two distinct steps in the trainer's output; run more --steps")
    return (marks[last] - marks[first]) / (last - first)


def run_training(command: list[str], output: Path, threads: int) -> tuple[float, float]:
    """Wall seconds of one training process (from a fresh output folder) and its seconds per step."""
    import shutil

    shutil.rmtree(output, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=output.parent)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SkingenError(f"{command[1]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    if not (output / "diffusion_pytorch_model.safetensors").is_file():
        raise SkingenError(f"{command[1]}: no ControlNet weights in {output}")
    return wall, seconds_per_step(proc.stderr)


# ---------------------------------------------------------------------------------------------------------------
# The fixed-noise validation loss (diffusers' models and the flow-matching step of diffusers' trainers)


class FixedNoiseLoss:
    """Velocity MSE of ControlNet + frozen transformer on held-out rows at fixed sigmas with fixed noise."""

    def __init__(self, backbone: str, base: Path, source: Path, rows: list[dict], resolution: int):
        import diffusers

        self.backbone = backbone
        pipeline_class = diffusers.StableDiffusion3Pipeline if backbone == "sd3" else diffusers.FluxPipeline
        pipeline = pipeline_class.from_pretrained(base)
        self.transformer, vae = pipeline.transformer.eval(), pipeline.vae.eval()
        prompts = [row["text"] for row in rows]
        with torch.no_grad():
            if backbone == "sd3":
                embeds, _, pooled, _ = pipeline.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                             max_sequence_length=77)  # fmt: skip
                self.text = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
            else:
                embeds, pooled, text_ids = pipeline.encode_prompt(prompts, prompts, max_sequence_length=512)
                self.text = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
            pixels = torch.stack([self._pixels(source / row["image"], resolution) for row in rows])
            controls = torch.stack([self._pixels(source / row["conditioning_image"], resolution) for row in rows])
            self.latents = self._normalize(vae, vae.encode(pixels).latent_dist.mode())
            self.control = self._normalize(vae, vae.encode(controls).latent_dist.mode())
        generator = torch.Generator().manual_seed(1234)
        self.noise = [torch.randn(self.latents.shape, generator=generator) for _ in EVAL_SIGMAS]

    @staticmethod
    def _pixels(path: Path, resolution: int) -> torch.Tensor:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB").resize((resolution, resolution)), dtype=np.float32)
        return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1)

    @staticmethod
    def _normalize(vae, latents: torch.Tensor) -> torch.Tensor:
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    @torch.no_grad()
    def __call__(self, controlnet) -> float:
        controlnet.eval()
        losses = []
        for sigma, noise in zip(EVAL_SIGMAS, self.noise):
            noisy = (1.0 - sigma) * self.latents + sigma * noise
            timesteps = torch.full((noisy.shape[0],), sigma * 1000.0)
            prediction = (self._sd3 if self.backbone == "sd3" else self._flux)(controlnet, noisy, timesteps)
            losses.append(torch.nn.functional.mse_loss(prediction, noise - self.latents).item())
        return float(np.mean(losses))

    def _sd3(self, controlnet, noisy, timesteps):
        control = controlnet(hidden_states=noisy, controlnet_cond=self.control, timestep=timesteps,
                             return_dict=False, **self.text)[0]  # fmt: skip
        return self.transformer(hidden_states=noisy, timestep=timesteps, block_controlnet_hidden_states=control,
                                return_dict=False, **self.text)[0]  # fmt: skip

    def _flux(self, controlnet, noisy, timesteps):
        from diffusers import FluxControlNetPipeline

        b, c, h, w = noisy.shape
        pack = FluxControlNetPipeline._pack_latents
        image_ids = FluxControlNetPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        guidance = torch.full((b,), 3.5) if self.transformer.config.guidance_embeds else None
        common = {"timestep": timesteps / 1000, "guidance": guidance, "img_ids": image_ids, **self.text}
        double, single = controlnet(hidden_states=pack(noisy, b, c, h, w), controlnet_cond=pack(self.control, b, c, h, w),
                                    return_dict=False, **common)  # fmt: skip
        packed = self.transformer(hidden_states=pack(noisy, b, c, h, w), controlnet_block_samples=double,
                                  controlnet_single_block_samples=single, return_dict=False, **common)[0]  # fmt: skip
        return FluxControlNetPipeline._unpack_latents(packed, h * 8, w * 8, 8)


def load_controlnet(backbone: str, folder: Path):
    import diffusers

    cls = diffusers.SD3ControlNetModel if backbone == "sd3" else diffusers.FluxControlNetModel
    return cls.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------


def bench_backbone(backbone: str, args, work: Path, source: Path, rows: list[dict]) -> dict:
    base = work / backbone / "base"
    if not (base / "model_index.json").is_file():
        build_tiny_pipeline(backbone, base, seed=0)
    init = starting_controlnet(backbone, base, work / backbone / "init_controlnet")
    train_rows, eval_rows = rows[: args.train_rows], rows[args.train_rows : args.train_rows + args.eval_rows]
    ours_data, theirs_data = source, parquet_copy(source, work / backbone, train_rows)
    evaluate = FixedNoiseLoss(backbone, base, source, eval_rows, args.resolution)
    result = {"initial_loss": evaluate(load_controlnet(backbone, init)), "trainers": {}}
    runs = {"skingen": [], "diffusers": []}
    # Seed by seed, the two trainers one after the other: both see the same machine load.
    for seed in args.seeds:
        for trainer, data in (("skingen", ours_data), ("diffusers", theirs_data)):
            output = work / backbone / f"{trainer}_runs" / f"seed{seed}"
            output.parent.mkdir(parents=True, exist_ok=True)
            command = training_command(trainer, backbone, args, base=base, controlnet=init, data=data, output=output,
                                       steps=args.steps, seed=seed)  # fmt: skip
            wall, step_time = run_training(command, output, args.threads)
            loss = evaluate(load_controlnet(backbone, output))
            runs[trainer].append((wall, step_time, loss))
            print(f"{backbone} {trainer} seed {seed}: process {wall:.1f} s, {step_time:.3f} s/step, "
                  f"fixed-noise loss {loss:.4f}", flush=True)  # fmt: skip
    for trainer, measured in runs.items():
        walls, step_times, losses = (list(column) for column in zip(*measured))
        result["trainers"][trainer] = {
            "seconds_per_step": statistics.mean(step_times),
            "seconds_per_step_sd": statistics.stdev(step_times) if len(step_times) > 1 else 0.0,
            "step_times": step_times,
            "walls": walls,
            "losses": losses,
            "loss_mean": statistics.mean(losses),
            "loss_sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        }
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir).resolve()
    source, rows = make_data(work / "data", args.train_rows + args.eval_rows, args.resolution, args.train_rows)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "diffusers_examples"}, "backbones": {}}
    for backbone in args.backbones:
        results["backbones"][backbone] = bench_backbone(backbone, args, work, source, rows)
    (work / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"\n{args.steps} steps, batch {args.train_batch_size}, {args.resolution} px, lr {args.learning_rate}, "
          f"seeds {args.seeds}, {args.threads} thread(s)\n")  # fmt: skip
    print("| backbone | trainer | s/step (mean +- sd) | whole process, s | fixed-noise val loss (mean +- sd) | "
          "before training |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for backbone, result in results["backbones"].items():
        for trainer, numbers in result["trainers"].items():
            print(f"| {backbone} | {trainer} | {numbers['seconds_per_step']:.3f} +- {numbers['seconds_per_step_sd']:.3f} "
                  f"| {statistics.mean(numbers['walls']):.0f} | {numbers['loss_mean']:.4f} +- {numbers['loss_sd']:.4f} "
                  f"| {result['initial_loss']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
