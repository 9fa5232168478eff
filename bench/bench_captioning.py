"""Throughput of caption.py's template captioner (images/s) on synthetic skins.

    python bench/bench_captioning.py --num_images 200 --resolution 512 --threads 2

Reports the captioner alone (images already decoded) and the whole stage through caption.main
(reading rows, decoding PNGs, captioning, atomic train.jsonl rewrites every --save_every images).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import caption  # noqa: E402
from skingen.captioning import TemplateCaptioner  # noqa: E402
from skingen.data import read_rows, write_rows  # noqa: E402


def synthetic_skin(rng: np.random.Generator, resolution: int) -> Image.Image:
    """A gradient background with a candidate bar and rows of keys, roughly like a merged skin."""
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, resolution)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp).repeat(resolution, axis=1).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, resolution, resolution // 8), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    key = tuple(int(v) for v in rng.integers(0, 256, 3))
    step = resolution // 10
    for row in range(4):
        for col in range(10):
            x0, y0 = col * step + 2, resolution // 3 + row * step + 2
            draw.rounded_rectangle((x0, y0, x0 + step - 4, y0 + step - 4), 4, fill=key)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="OpenCV threads")
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    rng = np.random.default_rng(0)
    images = [synthetic_skin(rng, args.resolution) for _ in range(args.num_images)]

    captioner = TemplateCaptioner()
    captioner.caption(images[:2])  # warm-up
    start = time.perf_counter()
    captions = captioner.caption(images)
    alone = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp)
        (dataset / "images").mkdir()
        for index, image in enumerate(images):
            image.save(dataset / "images" / f"{index}.png")
        write_rows(dataset, [{"image": f"images/{index}.png", "text": ""} for index in range(len(images))])
        start = time.perf_counter()
        caption.main(["--dataset_dir", str(dataset), "--captioner", "template", "--batch_size", "16"])
        stage = time.perf_counter() - start
        assert all(row["text"] for row in read_rows(dataset))

    print(f"example: {captions[0]}")
    print(f"template captioner, {args.num_images} images at {args.resolution} px, {args.threads} OpenCV threads:")
    print(f"  captioner alone: {args.num_images / alone:.1f} images/s ({1000 * alone / args.num_images:.1f} ms/image)")
    print(f"  caption.py stage (decode + caption + jsonl writes): {args.num_images / stage:.1f} images/s")


if __name__ == "__main__":
    main()
