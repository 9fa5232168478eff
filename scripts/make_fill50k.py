"""Make ControlNet's "fill50k" toy dataset in our train.jsonl form (the seed checked its trainer with it).

Each sample: the conditioning image is a circle's outline (white on black); the target is the same circle
filled with one named colour on a background of another; the caption names both, e.g.
"pale golden rod circle with old lace background".

    python scripts/make_fill50k.py --out datasets/fill50k --n 50000 --resolution 512 --seed 0

Each sample depends only on (seed, index), so a rerun resumes where a killed one stopped and gives identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skingen.config import parse_args_with_config  # noqa: E402
from skingen.errors import SkingenError, run_cli  # noqa: E402
from skingen.fileio import atomic_save_image, atomic_write_json, write_jsonl  # noqa: E402

# CSS colour names, spelled as words the way fill50k's captions spell them.
COLOURS = {
    "alice blue": (240, 248, 255),
    "antique white": (250, 235, 215),
    "aqua marine": (127, 255, 212),
    "azure": (240, 255, 255),
    "beige": (245, 245, 220),
    "blue violet": (138, 43, 226),
    "brown": (165, 42, 42),
    "burly wood": (222, 184, 135),
    "cadet blue": (95, 158, 160),
    "chocolate": (210, 105, 30),
    "coral": (255, 127, 80),
    "corn flower blue": (100, 149, 237),
    "corn silk": (255, 248, 220),
    "crimson": (220, 20, 60),
    "dark cyan": (0, 139, 139),
    "dark golden rod": (184, 134, 11),
    "dark khaki": (189, 183, 107),
    "dark olive green": (85, 107, 47),
    "dark orchid": (153, 50, 204),
    "dark salmon": (233, 150, 122),
    "dark slate blue": (72, 61, 139),
    "deep pink": (255, 20, 147),
    "deep sky blue": (0, 191, 255),
    "dodger blue": (30, 144, 255),
    "fire brick": (178, 34, 34),
    "floral white": (255, 250, 240),
    "forest green": (34, 139, 34),
    "gainsboro": (220, 220, 220),
    "ghost white": (248, 248, 255),
    "golden rod": (218, 165, 32),
    "honey dew": (240, 255, 240),
    "hot pink": (255, 105, 180),
    "indian red": (205, 92, 92),
    "ivory": (255, 255, 240),
    "khaki": (240, 230, 140),
    "lavender blush": (255, 240, 245),
    "lawn green": (124, 252, 0),
    "lemon chiffon": (255, 250, 205),
    "light coral": (240, 128, 128),
    "light sea green": (32, 178, 170),
    "light steel blue": (176, 196, 222),
    "lime green": (50, 205, 50),
    "linen": (250, 240, 230),
    "medium orchid": (186, 85, 211),
    "medium purple": (147, 112, 219),
    "midnight blue": (25, 25, 112),
    "mint cream": (245, 255, 250),
    "misty rose": (255, 228, 225),
    "navajo white": (255, 222, 173),
    "navy": (0, 0, 128),
    "old lace": (253, 245, 230),
    "olive drab": (107, 142, 35),
    "orange red": (255, 69, 0),
    "pale golden rod": (238, 232, 170),
    "pale green": (152, 251, 152),
    "pale turquoise": (175, 238, 238),
    "papaya whip": (255, 239, 213),
    "peach puff": (255, 218, 185),
    "peru": (205, 133, 63),
    "plum": (221, 160, 221),
    "powder blue": (176, 224, 230),
    "rosy brown": (188, 143, 143),
    "royal blue": (65, 105, 225),
    "saddle brown": (139, 69, 19),
    "sandy brown": (244, 164, 96),
    "sea green": (46, 139, 87),
    "sea shell": (255, 245, 238),
    "sienna": (160, 82, 45),
    "sky blue": (135, 206, 235),
    "slate gray": (112, 128, 144),
    "snow": (255, 250, 250),
    "spring green": (0, 255, 127),
    "steel blue": (70, 130, 180),
    "tan": (210, 180, 140),
    "teal": (0, 128, 128),
    "thistle": (216, 191, 216),
    "tomato": (255, 99, 71),
    "turquoise": (64, 224, 208),
    "wheat": (245, 222, 179),
    "white smoke": (245, 245, 245),
    "yellow green": (154, 205, 50),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", required=True, help="dataset folder to write (train.jsonl, images/, conditioning_images/)"
    )
    parser.add_argument("--n", type=int, default=50000, help="number of samples")
    parser.add_argument("--resolution", type=int, default=512, help="square image size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives identical files")
    return parse_args_with_config(parser, argv)


def sample_spec(index: int, resolution: int, seed: int) -> dict:
    """Colours and circle of one sample; depends only on its arguments (so resuming needs no earlier samples)."""
    rng = random.Random(f"fill50k:{seed}:{index}")
    circle_name, background_name = rng.sample(sorted(COLOURS), 2)
    radius = rng.uniform(0.1, 0.4) * resolution
    cx = rng.uniform(radius, resolution - radius)
    cy = rng.uniform(radius, resolution - radius)
    return {
        "circle": circle_name,
        "background": background_name,
        "bounds": [cx - radius, cy - radius, cx + radius, cy + radius],
        "caption": f"{circle_name} circle with {background_name} background",
    }


def draw_sample(spec: dict, resolution: int) -> tuple[Image.Image, Image.Image]:
    """(target, conditioning): the filled circle on its background, and its outline in white on black."""
    target = Image.new("RGB", (resolution, resolution), COLOURS[spec["background"]])
    ImageDraw.Draw(target).ellipse(spec["bounds"], fill=COLOURS[spec["circle"]])
    conditioning = Image.new("RGB", (resolution, resolution), (0, 0, 0))
    ImageDraw.Draw(conditioning).ellipse(spec["bounds"], outline=(255, 255, 255), width=max(1, resolution // 128))
    return target, conditioning


def check_settings(out: Path, settings: dict) -> None:
    """A folder started with other settings cannot be resumed: its finished images would not match."""
    recorded_path = out / "fill50k.json"
    if not recorded_path.is_file():
        return
    recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    differing = {k: (recorded.get(k), v) for k, v in settings.items() if k != "n" and recorded.get(k) != v}
    if differing:
        what = ", ".join(f"--{k} {old} (now {new})" for k, (old, new) in differing.items())
        raise SkingenError(f"{out} was made with {what}; use a new --out folder or the same settings")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.n < 1 or args.resolution < 8:
        raise SkingenError("--n must be at least 1 and --resolution at least 8")
    out = Path(args.out)
    settings = {"n": args.n, "resolution": args.resolution, "seed": args.seed}
    check_settings(out, settings)
    atomic_write_json(out / "fill50k.json", settings)

    rows, made = [], 0
    for index in tqdm(range(args.n), desc="fill50k", disable=None):
        image_rel, cond_rel = f"images/{index}.png", f"conditioning_images/{index}.png"
        spec = sample_spec(index, args.resolution, args.seed)
        # Images are written atomically, so one that exists is complete and a rerun skips it.
        if not (out / image_rel).is_file() or not (out / cond_rel).is_file():
            target, conditioning = draw_sample(spec, args.resolution)
            atomic_save_image(target, out / image_rel)
            atomic_save_image(conditioning, out / cond_rel)
            made += 1
        rows.append({"text": spec["caption"], "image": image_rel, "conditioning_image": cond_rel})
    write_jsonl(out / "train.jsonl", rows)
    print(
        f"{out}: {args.n} samples at {args.resolution}px ({made} made now, {args.n - made} already there); rows in train.jsonl"
    )


if __name__ == "__main__":
    run_cli(main)
