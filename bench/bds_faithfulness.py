"""Faithfulness of the Baidu .bds reader, as a Markdown table: each synthetic package's 26-key portrait keyboard
drawn by skingen.skins.bds.render against the package's own demo.png (drawn straight from the generator's geometry,
not through the reader), edge F1 after scaling, per seed (mean and spread over the packages), and as a control
the same against the demo moved right by 3% of its width (what a misplaced drawing scores); the round trip
(keyboard image -> .bds -> drawn again) as the share of pixel-exact packages; time to draw one keyboard.

    python bench/bds_faithfulness.py --seeds 0 1 2 --num_skins 8 --widths 360 512 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skingen.prep.glyphs import find_cjk_font  # noqa: E402
from skingen.skins.bds.package import BdsPackage  # noqa: E402
from skingen.skins.bds.render import demo_edge_f1, render_keyboard  # noqa: E402
from skingen.skins.bds.synthetic import write_synthetic_bds  # noqa: E402
from skingen.skins.bds.writer import write_keyboard_bds  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_skins", type=int, default=8)
    parser.add_argument("--widths", type=int, nargs="+", default=[360, 512, 256])
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    font = str(find_cjk_font())
    print("| seed | width | demo edge F1 mean | spread (sd) | control: demo moved 3% | round trip exact | draw time / keyboard |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            skins = [write_synthetic_bds(Path(tmp), i, seed, font) for i in range(args.num_skins)]
            for width in args.widths:
                scores, moved, exact, seconds = [], [], 0, []
                for skin in skins:
                    with BdsPackage(skin) as package:
                        board = package.keyboard("py_26", "port")
                        start = time.perf_counter()
                        image = render_keyboard(package, board, width).image
                        seconds.append(time.perf_counter() - start)
                        demo = package.demo()
                        scores.append(demo_edge_f1(image, demo))
                        shifted = Image.new("RGBA", demo.size, (0, 0, 0, 255))
                        shifted.paste(demo, (round(demo.width * 0.03), 0))
                        moved.append(demo_edge_f1(image, shifted))
                    out = Path(tmp) / f"rt_{seed}_{width}_{skin.stem}.bds"
                    write_keyboard_bds(image, skin, "py_26", "port", out, skin.stem)
                    with BdsPackage(out) as written:
                        again = render_keyboard(written, written.keyboard("py_26", "port"), width).image
                    exact += np.array_equal(np.asarray(again), np.asarray(image))
                print(f"| {seed} | {width} | {statistics.mean(scores):.3f} | {statistics.pstdev(scores):.3f} | "
                      f"{statistics.mean(moved):.3f} | "
                      f"{exact}/{len(skins)} | {statistics.mean(seconds) * 1000:.0f} ms |")  # fmt: skip


if __name__ == "__main__":
    main()
