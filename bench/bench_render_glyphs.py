"""Throughput of render_glyphs.py per mode (images/s) on synthetic 512 px skins with text.

    python bench/bench_render_glyphs.py --num_images 24 --resolution 512 --threads 2

Each mode runs from scratch on a fresh copy of the same dataset folder; the time covers the
whole stage (reading rows and images, OCR, drawing, atomic writes, train.jsonl updates).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import render_glyphs  # noqa: E402
from skingen import data  # noqa: E402
from skingen.glyphs import find_cjk_font  # noqa: E402

WORDS = ["前往", "搜索", "设置", "Hello", "皮肤", "中/英", "表情", "发送"]


def make_dataset(root: Path, num_images: int, resolution: int, font_path: Path) -> None:
    (root / "images").mkdir(parents=True)
    font = ImageFont.truetype(str(font_path), max(12, resolution // 16))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(num_images):
        image = Image.new("RGB", (resolution, resolution), tuple(int(v) for v in rng.integers(30, 200, 3)))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, resolution - 1, resolution // 8), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        for k in range(4):
            x0, y0 = resolution // 16 + (k % 2) * resolution // 2, resolution // 3 + (k // 2) * resolution // 4
            draw.rounded_rectangle((x0, y0, x0 + resolution * 7 // 16, y0 + resolution // 6), 10, fill=(235, 235, 240))
            draw.text((x0 + 12, y0 + 12), WORDS[(i + k) % len(WORDS)], font=font, fill=(20, 20, 20))
        image.save(root / "images" / f"skin_{i}.png")
        rows.append({"image": f"images/skin_{i}.png", "layout": "key_elements", "text": ""})
    data.write_rows(root, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="OpenCV and onnxruntime threads.")
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        make_dataset(source, args.num_images, args.resolution, find_cjk_font())
        for mode in ("canny", "template", "glyph"):
            work = Path(tmp) / mode
            shutil.copytree(source, work)
            flags = ["--dataset_dir", str(work), "--mode", mode, "--ocr_num_threads", str(args.threads)]
            start = time.perf_counter()
            render_glyphs.main(flags)
            seconds = time.perf_counter() - start
            print(
                f"RESULT {mode}: {args.num_images} images at {args.resolution} px in {seconds:.2f} s = "
                f"{args.num_images / seconds:.1f} images/s ({args.threads} threads)",
                flush=True,
            )


if __name__ == "__main__":
    main()
