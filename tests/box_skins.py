"""The per-backbone trainer tests' dataset: small skins with one text box each and short captions."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw


def write_box_skins(root: Path, num_rows: int) -> Path:
    """``num_rows`` rows of 80x64 skins, each with one white key (its text box) and a caption that T5 reads whole."""
    (root / "images").mkdir()
    (root / "conditioning_images").mkdir()
    rows = []
    for i in range(num_rows):
        image = Image.new("RGB", (80, 64), (50 * i, 120, 200 - 40 * i))
        ImageDraw.Draw(image).rectangle((12, 12, 44, 30), fill=(255, 255, 255))
        image.save(root / "images" / f"{i}.png")
        control = Image.new("RGB", (80, 64))
        ImageDraw.Draw(control).rectangle((12, 12, 44, 30), outline=(255, 255, 255))
        control.save(root / "conditioning_images" / f"{i}.png")
        rows.append({"text": f'skin {i} writing "前往"', "image": f"images/{i}.png",
                     "conditioning_image": f"conditioning_images/{i}.png",
                     "box": [[[12, 12], [44, 12], [44, 30], [12, 30]]]})
    (root / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return root
