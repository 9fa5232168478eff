#!/usr/bin/env python3
"""Does the OCR text loss make generated text more readable? The same training run with and without it.

    python bench/text_loss_ab.py                             # 3 seeds x 2 arms, tiny preset, 128 px, CPU
    python bench/text_loss_ab.py --seeds 0 1 2 3 4 --text_loss_weight 0.02 0.1 -- \
        --text_loss_max_timestep 1000 --text_loss_timestep_weighting alpha_bar   # flags after -- go to the trainer

Builds once in --work_dir:

- a glyph dataset of keyboard-like images: 2-character key labels drawn in keys on patterned backgrounds;
  control images are the key outlines with the labels re-rendered white (``render_glyphs.py --mode glyph``);
  rows carry ``box`` + ``texts``;
- a tiny SDXL pipeline whose VAE is fitted to reconstruct those images (``skingen.models.fit_tiny_vae``): a
  random tiny VAE decodes noise, so no recognizer could read anything through it. How many labels the
  recognizer reads in the VAE's reconstructions is printed: that is the ceiling of what training can reach.

Then, per seed, trains the ControlNet with identical data order, noise and timesteps: ``--text_loss_weight 0``
(the diffusion loss alone; the text loss is still measured, not added) and ``--text_loss_weight W`` for each W. Both
record the fixed-timestep validation loss (``--validation_loss_timesteps``, fixed noise, every row):
``val_text_ctc``, the recognizer's CTC per character on the boxes of the one-step x0 estimate, and
``val_loss_diffusion``. The summary compares the arms at the end of training.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LABELS = ("前往", "搜索", "删除", "换行", "发送", "空格", "返回", "确定", "完成", "符号", "中文", "英文",
          "表情", "数字", "拼音", "分词", "重输", "选择", "复制", "粘贴", "剪切", "全选", "撤销", "设置")


def write_glyph_dataset(out_dir: Path, *, rows: int, resolution: int, keys_per_row: int, font_size: int,
                        seed: int = 0) -> Path:
    """``rows`` images of ``keys_per_row`` labelled keys in a column on a gradient with random discs."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from skingen.glyphs import find_cjk_font, render_glyph_control
    from skingen.ocr import TextLine

    rng = np.random.default_rng(seed)
    font_path = find_cjk_font()
    font = ImageFont.truetype(str(font_path), font_size)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "conditioning_images").mkdir(exist_ok=True)
    lines = []
    key_h = resolution // keys_per_row
    for i in range(rows):
        top, bottom = rng.integers(60, 230, 3), rng.integers(20, 200, 3)
        ramp = np.linspace(0, 1, resolution)[:, None, None]
        pixels = (top * (1 - ramp) + bottom * ramp).repeat(resolution, axis=1).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y, r = rng.integers(0, resolution, 2).tolist() + [int(rng.integers(4, resolution // 6))]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 256, 3).tolist()))
        template = Image.new("RGB", (resolution, resolution))
        template_draw = ImageDraw.Draw(template)
        key_fill = tuple(rng.integers(200, 256, 3).tolist())
        ink = tuple(rng.integers(0, 70, 3).tolist())
        boxes, texts = [], []
        for k in range(keys_per_row):
            key = (4, k * key_h + 3, resolution - 5, (k + 1) * key_h - 4)
            draw.rounded_rectangle(key, radius=4, fill=key_fill)
            template_draw.rounded_rectangle(key, radius=4, outline=(96, 96, 96))
            word = LABELS[int(rng.integers(len(LABELS)))]
            left, top_, right, bottom_ = font.getbbox(word)
            x0 = int(rng.integers(key[0] + 2, max(key[0] + 3, key[2] - (right - left) - 2)))
            y0 = (key[1] + key[3] - (bottom_ - top_)) // 2
            draw.text((x0 - left, y0 - top_), word, font=font, fill=ink)
            x1, y1 = x0 + right - left, y0 + bottom_ - top_
            boxes.append([[x0 - 2, y0 - 2], [x1 + 2, y0 - 2], [x1 + 2, y1 + 2], [x0 - 2, y1 + 2]])
            texts.append(word)
        control = render_glyph_control(template, [TextLine(b, t, 1.0) for b, t in zip(boxes, texts)], font_path)
        image.save(out_dir / "images" / f"{i}.png")
        control.save(out_dir / "conditioning_images" / f"{i}.png")
        lines.append(json.dumps({
            "text": "a keyboard skin, iflyskin, " + ", ".join(f'writing "{t}"' for t in texts),
            "image": f"images/{i}.png", "conditioning_image": f"conditioning_images/{i}.png",
            "box": boxes, "texts": texts,
        }, ensure_ascii=False))
    (out_dir / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_dir


def build_fitted_pipeline(out_dir: Path, dataset_dir: Path, *, resolution: int, vae_fit_steps: int,
                          seed: int = 0) -> dict:
    """A tiny SDXL pipeline (+ ControlNet) whose VAE reconstructs the dataset's images; returns the fit's figures
    and how many labels the recognizer reads in the reconstructions."""
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from skingen.losses import crop_rotated_boxes
    from skingen.models import build_tiny_sdxl, fit_tiny_vae
    from skingen.recognizer import load_recognizer, normalize_for_recognizer
    from skingen.training_data import training_pixels

    rows = [json.loads(line) for line in (dataset_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    images = [training_pixels(Image.open(dataset_dir / row["image"]).convert("RGB"), resolution)[0] for row in rows]
    build_tiny_sdxl(out_dir, preset="tiny", seed=seed, controlnet=True)
    stats = fit_tiny_vae(out_dir, images, steps=vae_fit_steps, seed=seed)
    vae = AutoencoderKL.from_pretrained(out_dir / "vae")
    recognizer = load_recognizer()
    read = total = 0
    with torch.no_grad():
        for image, row in zip(images, rows):
            decoded = vae.decode(vae.encode(image[None]).latent_dist.mode()).sample[0]
            crops, _ = crop_rotated_boxes(decoded, torch.tensor(row["box"], dtype=torch.float32))
            readings = recognizer.read(normalize_for_recognizer(crops, value_range=(-1.0, 1.0)))
            read += sum(text == expected for (text, _), expected in zip(readings, row["texts"]))
            total += len(row["texts"])
    return {**stats, "labels_read_in_reconstructions": read, "labels": total}


def run_arm(pipeline_dir: Path, dataset_dir: Path, output_dir: Path, *, seed: int, text_loss_weight: float,
            max_train_steps: int, validation_steps: int, resolution: int, learning_rate: float,
            eval_timesteps: list[int], trainer_flags: list[str]) -> dict:
    """One training run of train_controlnet_sdxl_ctc.py in this process; its fixed-timestep validation curve."""
    from skingen.training import train

    script = _trainer_script()
    argv = [
        "--pretrained_model_name_or_path", str(pipeline_dir), "--train_data_dir", str(dataset_dir),
        "--output_dir", str(output_dir), "--resolution", str(resolution), "--train_batch_size", "2",
        "--learning_rate", str(learning_rate), "--lr_warmup_steps", "0", "--seed", str(seed), "--report_to", "none",
        "--max_train_steps", str(max_train_steps), "--validation_steps", str(validation_steps),
        "--checkpointing_steps", str(max_train_steps + 1), "--validation_loss_rows", "1000000",
        "--validation_loss_timesteps", *map(str, eval_timesteps), "--text_loss_weight", str(text_loss_weight),
        *trainer_flags,
    ]
    args = script.parse_args(argv)
    started = time.perf_counter()
    result = train(args, extra_loss=script.build_text_loss(args))
    _reset_accelerate_state()
    return {"seconds": time.perf_counter() - started, "curve": result.validation_losses}


@functools.cache
def _trainer_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_controlnet_sdxl_ctc", REPO / "train_controlnet_sdxl_ctc.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def late_mean(curve: dict[int, dict[str, float]], key: str) -> float:
    """Mean of ``key`` over the evaluations in the second half of training (less noisy than the last one)."""
    end = max(curve)
    return statistics.mean(values[key] for step, values in curve.items() if step > end / 2)


def _reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=Path("bench_text_loss_ab"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--text_loss_weight", type=float, nargs="+", default=[0.05],
                        help="One or more weights, each compared with weight 0 (run once per seed).")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--validation_steps", type=int, default=50)
    parser.add_argument("--eval_timesteps", type=int, nargs="+", default=[50, 150, 250],
                        help="The fixed timesteps of the validation loss (--validation_loss_timesteps).")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--keys_per_row", type=int, default=3)
    parser.add_argument("--font_size", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--vae_fit_steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="Also write every curve to this file.")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER,
                        help="After --: flags for train_controlnet_sdxl_ctc.py (e.g. --text_loss_max_timestep 1000).")
    args = parser.parse_args(argv)
    args.trainer_flags = [f for f in args.trainer_flags if f != "--"]
    return args


def print_summary(results: dict, seeds: list[int], weight: float, header: str) -> None:
    """A markdown table per seed (weight 0 vs ``weight``) and the mean effect over seeds."""
    print(f"\nweight 0 vs {weight:g}, {header}; 'late' = mean over the evaluations in the second half of training:")
    print("| seed | val_text_ctc start | end, weight 0 | end, text loss | late, weight 0 | late, text loss "
          "| val_loss_diffusion late, weight 0 | late, text loss |")
    print("|---|---|---|---|---|---|---|---|")
    ctc_gain, diffusion_change = [], []
    for seed in seeds:
        zero, text = results[(seed, 0.0)]["curve"], results[(seed, weight)]["curve"]
        end = max(zero)
        row = [zero[0]["val_text_ctc"], zero[end]["val_text_ctc"], text[end]["val_text_ctc"],
               late_mean(zero, "val_text_ctc"), late_mean(text, "val_text_ctc"),
               late_mean(zero, "val_loss_diffusion"), late_mean(text, "val_loss_diffusion")]
        print(f"| {seed} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
        ctc_gain.append(1 - row[4] / row[3])
        diffusion_change.append(row[6] / row[5] - 1)
    spread = statistics.stdev(ctc_gain) if len(ctc_gain) > 1 else float("nan")
    print(f"late val_text_ctc lower with the text loss in {sum(g > 0 for g in ctc_gain)}/{len(ctc_gain)} seeds, "
          f"by {100 * statistics.mean(ctc_gain):.0f}% on average (sd {100 * spread:.0f}%); late val_loss_diffusion "
          f"{100 * statistics.mean(diffusion_change):+.1f}% ({100 * min(diffusion_change):+.1f}% .. "
          f"{100 * max(diffusion_change):+.1f}%)")


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset_dir, pipeline_dir = args.work_dir / "dataset", args.work_dir / "pipeline"
    if not (pipeline_dir / "model_index.json").is_file():
        write_glyph_dataset(dataset_dir, rows=args.rows, resolution=args.resolution, keys_per_row=args.keys_per_row,
                            font_size=args.font_size)
        started = time.perf_counter()
        fit = build_fitted_pipeline(pipeline_dir, dataset_dir, resolution=args.resolution,
                                    vae_fit_steps=args.vae_fit_steps)
        print(f"VAE fitted in {time.perf_counter() - started:.0f} s: L1 {fit['initial_l1']:.3f} -> {fit['final_l1']:.3f}; "
              f"the recognizer reads {fit['labels_read_in_reconstructions']}/{fit['labels']} labels in its reconstructions")
    results = {}
    for seed in args.seeds:
        for weight in [0.0, *args.text_loss_weight]:
            arm = run_arm(pipeline_dir, dataset_dir, args.work_dir / f"seed{seed}_w{weight:g}", seed=seed,
                          text_loss_weight=weight, max_train_steps=args.max_train_steps,
                          validation_steps=args.validation_steps, resolution=args.resolution,
                          learning_rate=args.learning_rate, eval_timesteps=args.eval_timesteps,
                          trainer_flags=args.trainer_flags)
            results[(seed, weight)] = arm
            curve = arm["curve"]
            print(f"seed {seed} weight {weight:g} ({arm['seconds']:.0f} s): val_text_ctc "
                  + " ".join(f"{step}:{values.get('val_text_ctc', float('nan')):.3f}" for step, values in curve.items())
                  + f" | val_loss_diffusion {curve[0]['val_loss_diffusion']:.4f} -> "
                  f"{curve[max(curve)]['val_loss_diffusion']:.4f}", flush=True)
    header = f"{args.max_train_steps} steps, trainer flags {args.trainer_flags or 'default'}"
    for weight in args.text_loss_weight:
        print_summary(results, args.seeds, weight, header)
    if args.json:
        args.json.write_text(json.dumps({f"seed{s}_w{w:g}": r for (s, w), r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
