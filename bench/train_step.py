#!/usr/bin/env python3
"""Benchmark the ControlNet training step: step time, samples/s and peak memory, with and without caching.

Runs the real trainer (``skingen.train.loop.train``) on a randomly initialised model and a synthetic dataset,
once with the text-embedding + latent caches and once encoding images with the VAE at every step, each in a
fresh subprocess so its peak memory is its own. Step time is the median time between optimizer steps after
the warm-up steps; "1st step s" is the time from the start to the end of the first step (loading, caching and
the first, slowest step).

    python bench/train_step.py                              # CPU, tiny `small` preset at 256 px
    python bench/train_step.py --threads 1 --options all   # + each trainer option's overhead
    python bench/train_step.py --device cuda --sdxl_shaped --resolution 1024 --mixed_precision bf16 \
        --gradient_checkpointing --batch_size 1             # real SDXL UNet/ControlNet shapes, random weights

Trainer options (``--options ema snr_gamma ...``, or ``--options all``) are each timed in their own run with cached
latents, and compared with the plain cached run: the step-time overhead of each option.

Peak memory: CUDA ``torch.cuda.max_memory_allocated`` over the measured steps; CPU the process's peak
resident set size (``resource`` max RSS, setup included). An extra loss (e.g. the OCR text loss, ``--text_loss``)
is turned on by its trainer flags, through :func:`measure`'s ``extra_argv``, exactly as a user turns it on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Trainer options and the flags that turn each on (kohya/diffusers values typical for SDXL).
OPTIONS = {
    "ema": ["--use_ema"],
    "snr_gamma": ["--snr_gamma", "5.0"],
    "noise_offset": ["--noise_offset", "0.05"],
    "input_perturbation": ["--input_perturbation", "0.1"],
    "buckets": ["--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "1024", "--bucket_reso_steps", "64"],
    "unet_lora": ["--unet_lora_rank", "4"],
    "two_conditions": ["--conditioning_image_column", "conditioning_image", "conditioning_image_canny"],
}
sys.path.insert(0, str(REPO))

# stable-diffusion-xl-base-1.0/unet/config.json (architecture keys).
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
# stable-diffusion-xl-base-1.0/vae/config.json
SDXL_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}


def build_sdxl_shaped(out_dir: Path) -> Path:
    """An SDXL-shaped pipeline with random weights: the real UNet and VAE architectures, and 2-layer text
    encoders of SDXL's widths (768 + 1280, pooled 1280), which only matter at caching time."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from skingen.testing.tiny_sdxl import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "max_position_embeddings": 77, "num_hidden_layers": 2}
    text_one = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            projection_dim=768, hidden_act="quick_gelu", **ids))
    text_two = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                          num_attention_heads=20, projection_dim=1280,
                                                          hidden_act="gelu", **ids))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipeline = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SDXL_VAE), text_encoder=text_one, text_encoder_2=text_two, tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(), unet=UNet2DConditionModel(**SDXL_UNET), scheduler=scheduler,
        add_watermarker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_dataset(out_dir: Path, rows: int, resolution: int, boxes_per_row: int = 1) -> Path:
    """Random skins at the training size (so no resize cost is measured), ``boxes_per_row`` text boxes each."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    (out_dir / "images").mkdir(parents=True)
    (out_dir / "conditioning_images").mkdir()
    lines = []
    for i in range(rows):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(out_dir / "images" / f"{i}.png")
        control = Image.new("RGB", (resolution, resolution))
        boxes = []
        height = max(8, resolution // (2 * boxes_per_row))  # boxes stacked down the left half
        for k in range(boxes_per_row):
            x0, y0, x1, y1 = 8, 8 + k * height, resolution // 2, 8 + k * height + height - 4
            ImageDraw.Draw(control).rectangle((x0, y0, x1, y1), outline=(255, 255, 255))
            boxes.append([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        control.save(out_dir / "conditioning_images" / f"{i}.png")
        lines.append(json.dumps({"text": f"a keyboard skin {i}, iflyskin", "image": f"images/{i}.png",
                                 "conditioning_image": f"conditioning_images/{i}.png",
                                 "conditioning_image_canny": f"conditioning_images/{i}.png", "box": boxes,
                                 "texts": ["前往"] * boxes_per_row}, ensure_ascii=False))
    (out_dir / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_dir


def measure(options: argparse.Namespace, model_dir: Path, data_dir: Path, cache_latents: bool,
            extra_argv: list[str] | None = None) -> dict:
    """Train ``warmup + steps`` steps and time them (run in a fresh process for an honest peak memory)."""
    import torch

    from skingen.train.loop import build_arg_parser, parse_training_args, train

    work = Path(tempfile.mkdtemp(prefix="run-", dir=options.work_dir))
    argv = [
        "--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
        "--output_dir", str(work), "--resolution", str(options.resolution),
        "--train_batch_size", str(options.batch_size), "--max_train_steps", str(options.warmup + options.steps),
        "--checkpointing_steps", str(10**9), "--report_to", "none", "--seed", "0", "--learning_rate", "1e-5",
        "--mixed_precision", options.mixed_precision, "--cache_latents" if cache_latents else "--no_cache_latents",
    ]
    if options.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    argv += extra_argv or []
    args = parse_training_args(build_arg_parser(), argv)
    cuda = options.device == "cuda"
    times: list[float] = []
    cpu_times: list[float] = []  # process CPU time: steadier than wall time on a shared machine

    def on_step(step: int, logs: dict) -> None:
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        cpu_times.append(time.process_time())
        if cuda and step == options.warmup:
            torch.cuda.reset_peak_memory_stats()

    start = time.perf_counter()
    train(args, on_step=on_step)
    step_times = [b - a for a, b in zip(times[options.warmup - 1 :], times[options.warmup :])] if options.warmup else \
        [b - a for a, b in zip(times, times[1:])]
    step_s = statistics.median(step_times)
    first = max(options.warmup - 1, 0)
    cpu_step_s = statistics.median([b - a for a, b in zip(cpu_times[first:], cpu_times[first + 1:])])
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "caching": cache_latents, "first_step_s": round(times[0] - start, 2), "step_s": round(step_s, 4),
        "mean_step_s": round(statistics.fmean(step_times), 4), "cpu_step_s": round(cpu_step_s, 4),
        "samples_per_s": round(options.batch_size / step_s, 3), "peak_memory_mb": round(peak_mb, 1),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", choices=("tiny", "small"), default="small", help="Tiny SDXL preset (ignored with --sdxl_shaped).")
    parser.add_argument("--sdxl_shaped", action="store_true", help="Real SDXL UNet/VAE/ControlNet shapes, random weights (GPU).")
    parser.add_argument("--resolution", type=int, default=None, help="Default: 256 (small), 128 (tiny), 1024 (SDXL-shaped).")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own).")
    parser.add_argument("--warmup", type=int, default=2, help="Steps not timed.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps.")
    parser.add_argument("--work_dir", type=str, default=None, help="Where the model and data are built (default: a temp folder).")
    parser.add_argument("--text_loss", choices=("none", "ctc", "perceptual", "both"), default="none",
                        help="Also time the step with the OCR text loss of train_controlnet_sdxl_ctc.py.")
    parser.add_argument("--text_loss_max_timestep", type=int, default=1000,
                        help="Text loss where t <= this; 1000 (default here) pays its cost on every step.")
    parser.add_argument("--boxes_per_row", type=int, default=4, help="Text boxes per training image.")
    parser.add_argument("--options", nargs="+", choices=(*OPTIONS, "all"), default=(),
                        help="Also time the cached step with each of these trainer options on (one run each).")
    parser.add_argument("--only", choices=("cached", "uncached", "text", *OPTIONS), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    options = parse_args(argv)
    if options.resolution is None:
        options.resolution = 1024 if options.sdxl_shaped else {"small": 256, "tiny": 128}[options.preset]
    import torch

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    if options.only is not None:  # child process: one measurement, JSON on the last line
        work = Path(options.work_dir)
        flags = OPTIONS.get(options.only, [])
        if options.only == "text":  # the trainer's own text-loss flags, as a user turns it on
            flags = ["--text_loss_type", options.text_loss, "--text_loss_weight", "0.05",
                     "--text_loss_max_timestep", str(options.text_loss_max_timestep)]
        print(json.dumps(measure(options, work / "model", work / "data", options.only != "uncached",
                                 extra_argv=flags)))
        return
    if "all" in options.options:
        options.options = tuple(OPTIONS)

    if options.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is visible")
    temporary = options.work_dir is None
    work = Path(options.work_dir or tempfile.mkdtemp(prefix="skingen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model" / "model_index.json").is_file():
        if options.sdxl_shaped:
            build_sdxl_shaped(work / "model")
        else:
            from skingen.testing.tiny_sdxl import build_tiny_sdxl

            build_tiny_sdxl(work / "model", preset=options.preset)
    if not (work / "data").is_dir():
        write_dataset(work / "data", rows=options.batch_size * (options.warmup + options.steps),
                      resolution=options.resolution, boxes_per_row=options.boxes_per_row)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if options.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--work_dir", str(work),
             "--resolution", str(options.resolution)]
    model = "SDXL-shaped" if options.sdxl_shaped else f"tiny '{options.preset}'"
    print(f"{model} model, {options.device}, {options.resolution} px, batch {options.batch_size}, "
          f"mixed precision {options.mixed_precision}, gradient checkpointing {options.gradient_checkpointing}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'run':>18} {'1st step s':>10} {'median s':>8} {'mean s':>8} {'CPU s':>7} {'samples/s':>10} "
          f"{'peak MB':>9} {'vs cached (CPU s)':>17}")
    plain = None
    for only in ("cached", "uncached") + (("text",) if options.text_loss != "none" else ()) + tuple(options.options):
        finished = subprocess.run([*child, "--only", only], env=env, capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"error: the {only} run failed:\n{finished.stderr[-3000:]}")
        row = json.loads(finished.stdout.strip().splitlines()[-1])
        label = {"text": f"cached+{options.text_loss}", "cached": "cached", "uncached": "uncached"}.get(only, f"cached+{only}")
        plain = plain or row["cpu_step_s"]
        print(f"{label:>18} {row['first_step_s']:>10} {row['step_s']:>8} {row['mean_step_s']:>8} "
              f"{row['cpu_step_s']:>7} {row['samples_per_s']:>10} {row['peak_memory_mb']:>9} "
              f"{row['cpu_step_s'] / plain - 1:>+17.0%}")
    if temporary:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
