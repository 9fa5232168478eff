"""Throughput of merge_elements.py (skins/s) on synthetic packages, per resolution and worker count.

    python bench/bench_merge_elements.py --num_skins 32 --layout key_elements --resolutions 512 1024 --num_workers 1 2

The packages come from scripts/make_synthetic_skins.py (a quarter as .zip, half the keys 9-patch).
Each setting merges all of them from scratch into a fresh dataset folder; the time covers the
whole stage in-process (wall clock and CPU time; opening packages, decoding, fitting, compositing, PNG encoding, atomic
writes, train.jsonl), not Python start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import make_synthetic_skins  # noqa: E402

import merge_elements  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and its finished worker processes: comparable when the machine is shared."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_skins", type=int, default=32)
    parser.add_argument("--layout", default="key_elements")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--num_workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        skins = Path(tmp) / "skins"
        start = time.perf_counter()
        make_synthetic_skins.make_synthetic_skins(skins, args.num_skins, args.seed)
        made = time.perf_counter() - start
        print(f"made {args.num_skins} synthetic skins in {made:.2f} s ({args.num_skins / made:.1f} skins/s)")
        print("| layout | resolution | num_workers | seconds | skins/s | CPU ms/skin |\n|---|---|---|---|---|---|")
        for resolution in args.resolutions:
            for workers in args.num_workers:
                out = Path(tmp) / f"ds_{resolution}_{workers}"
                start, cpu_start = time.perf_counter(), cpu_seconds()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    merge_elements.main([
                        "--packages_dir", str(skins), "--layout", args.layout, "--resolution", str(resolution),
                        "--output_dir", str(out), "--num_workers", str(workers),
                    ])
                seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
                print(f"| {args.layout} | {resolution} | {workers} | {seconds:.2f} | {args.num_skins / seconds:.1f} "
                      f"| {1000 * cpu / args.num_skins:.0f} |")


if __name__ == "__main__":
    main()
