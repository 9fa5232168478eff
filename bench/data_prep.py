"""Throughput of the data-preparation stages on synthetic skins, as a Markdown table (images/s).

    python bench/data_prep.py --num_skins 8 --resolutions 512 1024 --threads 2
    python bench/data_prep.py --packages android --num_skins 30 --resolutions 512 --num_workers 2 --merge_only

``--packages android`` merges packages built like real Android themes (tests/android_theme.py: densities,
states, 9-patches, icons, XML shapes) with ``--element_map android``. First, the thin-strip case: time and
peak memory of fitting 1x2000 and 2x200 strips (plain and 9-patch) into a 1024x1024 box under every fit.

Per resolution, the stages run in order on one fresh dataset folder, as a user chains them:
merge_elements.py (packages from scripts/make_synthetic_skins.py), render_glyphs.py in canny, template
and glyph mode (each mode change redoes every row), then caption.py with the template captioner.
Each time covers the whole stage in-process (reading rows and images, the work, atomic writes,
train.jsonl rewrites), not Python start-up. CPU time (this process and its finished workers) is given
as well: on a shared machine wall time depends on the load, which is printed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import make_synthetic_skins  # noqa: E402
from android_theme import THEMES, write_theme  # noqa: E402

import caption  # noqa: E402
import merge_elements  # noqa: E402
import render_glyphs  # noqa: E402
from skingen.skins.atlas import draw_layer  # noqa: E402
from skingen.skins.ninepatch import encode_ninepatch, parse_ninepatch  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and its finished worker processes."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def timed(stage: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one stage, its progress bars and prints silenced."""
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        stage()
    return time.perf_counter() - start, cpu_seconds() - cpu_start


def stages(skins: Path, dataset: Path, resolution: int, args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """The stages in the order they run, each a call of the stage script's main."""
    render = ["--dataset_dir", str(dataset), "--ocr_num_threads", str(args.threads)]
    element_map = ["--element_map", "android"] if args.packages == "android" else []
    merge = {
        "merge_elements": lambda: merge_elements.main([
            "--packages_dir", str(skins), "--layout", args.layout, "--resolution", str(resolution),
            "--output_dir", str(dataset), "--num_workers", str(args.num_workers), *element_map,
        ]),
    }
    if args.merge_only:
        return merge
    return {
        **merge,
        "render_glyphs canny": lambda: render_glyphs.main([*render, "--mode", "canny"]),
        "render_glyphs template": lambda: render_glyphs.main([*render, "--mode", "template"]),
        "render_glyphs glyph": lambda: render_glyphs.main([*render, "--mode", "glyph"]),
        "caption template": lambda: caption.main(["--dataset_dir", str(dataset), "--captioner", "template"]),
    }  # fmt: skip


def thin_strips() -> str:
    """Time and peak-memory growth of fitting thin strips into a 1024x1024 box under every fit (Markdown)."""
    strips = {
        "1x2000 plain": Image.new("RGBA", (1, 2000), (1, 2, 3, 255)),
        "2x200 plain": Image.new("RGBA", (2, 200), (1, 2, 3, 255)),
        "2000x1 plain": Image.new("RGBA", (2000, 1), (1, 2, 3, 255)),
    }
    strips["2x200 9-patch"] = parse_ninepatch(encode_ninepatch(strips["2x200 plain"], ((0, 2),), ((40, 160),)))
    strips["1x2000 9-patch"] = parse_ninepatch(encode_ninepatch(strips["1x2000 plain"], ((0, 1),), ((100, 1900),)))
    rows = ["| strip | fit | ms | peak RSS growth MB |", "|---|---|---|---|"]
    for name, strip in strips.items():
        for fit in ("stretch", "contain", "cover", "nine_patch", "icon"):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            draw_layer(strip, fit, (1024, 1024))
            seconds = time.perf_counter() - start
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
            rows.append(f"| {name} | {fit} | {1000 * seconds:.1f} | {grown:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_skins", type=int, default=8)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--layout", default="key_elements")
    parser.add_argument("--num_workers", type=int, default=1, help="merge_elements.py worker processes")
    parser.add_argument("--threads", type=int, default=2, help="OpenCV and onnxruntime threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--packages", choices=("synthetic", "android"), default="synthetic")
    parser.add_argument("--merge_only", action="store_true", help="time merge_elements.py only")
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    load_before = os.getloadavg()
    print(thin_strips(), "\n")

    with tempfile.TemporaryDirectory() as tmp:
        skins = Path(tmp) / "skins"
        if args.packages == "android":
            for index in range(args.num_skins):
                write_theme(skins / f"theme_{index:04d}", THEMES[index % len(THEMES)])
        else:
            make_synthetic_skins.make_synthetic_skins(skins, args.num_skins, args.seed)
        rows = ["| stage | resolution | images | seconds | images/s | CPU ms/image |", "|---|---|---|---|---|---|"]
        for resolution in args.resolutions:
            dataset = Path(tmp) / f"dataset_{resolution}"
            for name, stage in stages(skins, dataset, resolution, args).items():
                seconds, cpu = timed(stage)
                rows.append(
                    f"| {name} | {resolution} | {args.num_skins} | {seconds:.2f} | {args.num_skins / seconds:.1f} "
                    f"| {1000 * cpu / args.num_skins:.0f} |"
                )
                print(rows[-1], file=sys.stderr, flush=True)  # progress while the table is being built

    print(
        f"{args.num_skins} {args.packages} skins, layout {args.layout}, {args.num_workers} merge worker(s), "
        f"{args.threads} OpenCV/onnxruntime threads, {os.cpu_count()} CPUs; load average (1/5/15 min) "
        f"before {'/'.join(f'{v:.1f}' for v in load_before)}, after {'/'.join(f'{v:.1f}' for v in os.getloadavg())}\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
