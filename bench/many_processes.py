"""Each sharded stage with 1 and 2 processes, and the worker pools with 1 and 2 workers, as a Markdown table.

    python bench/many_processes.py --num_skins 16 --resolution 512 --inference_rows 16

Every run is a fresh command line, as a user starts it: ``python script.py`` for one process (torch and the
OCR use every core, the default), ``torchrun --nproc_per_node 2 script.py`` for two (one thread each, as
torchrun sets; the OCR gets ``--ocr_num_threads 1``). Each time is the whole command; "start-up" is the same
command again with every row done (imports, reading rows, launching), and "work" is the difference. The outputs
of the two runs are compared byte for byte. Stages, on synthetic skins (scripts/make_synthetic_skins.py):
merge_elements (workers), render_glyphs glyph and canny, caption (template captioner; ``caption_blip``, not in the
default list: a random BLIP of small shapes), inference (tiny SDXL, 2 images a row), evaluate (edge F1 + RapidOCR on the text boxes), filter_dataset (workers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import make_synthetic_skins  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(script: str, argv: list[str], processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, str(REPO / script), *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            str(REPO / script), *argv]  # fmt: skip


def timed(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    finished = subprocess.run(cmd, env=env or ENV, cwd=REPO, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{finished.stderr[-3000:]}")
    return time.perf_counter() - start


def tree_bytes(folder: Path, names: list[str] | None = None) -> dict[str, bytes]:
    paths = [folder / n for n in names] if names else sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in paths}


def compare(stage: str, rows: int, script: str, make_argv, folders: dict[int, Path], compared, env1=None, env2=None,
            two: int = 2, label: str = "processes", resumes: bool = True) -> dict:
    """Run ``script`` on 1 and ``two`` processes (or workers: ``make_argv(n)``), each twice (work, then start-up:
    the rerun with every row done). ``resumes=False``: a finished run's rerun redoes the work (evaluate.py), so
    there is no start-up run."""
    result = {"stage": stage, "rows": rows, "label": label}
    for n, env in ((1, env1), (two, env2)):
        procs = 1 if label == "workers" else n
        first = timed(command(script, make_argv(n, folders[n]), procs), env)
        again = timed(command(script, make_argv(n, folders[n]), procs), env) if resumes else None
        result[n] = (first, again)
    result["same"] = compared(folders[1]) == compared(folders[two])
    return result


def row_line(r: dict) -> str:
    (t1, s1), (t2, s2) = r[1], r[2]
    if s1 is None:
        return (f"| {r['stage']} | {r['rows']} | 1 vs 2 {r['label']} | {t1:.1f} / {t2:.1f} | - | - | {t1 / t2:.2f}x | - | "
                f"{'yes' if r['same'] else 'NO'} |")  # fmt: skip
    work1, work2 = t1 - s1, t2 - s2
    # Work under a second (or a start-up run slower than the run itself) is below the noise of a shared machine.
    work_speedup = f"{work1 / work2:.2f}x" if min(work1, work2) >= 1.0 else "-"
    return (f"| {r['stage']} | {r['rows']} | 1 vs 2 {r['label']} | {t1:.1f} / {t2:.1f} | {s1:.1f} / {s2:.1f} | "
            f"{work1:.1f} / {work2:.1f} | {t1 / t2:.2f}x | {work_speedup} | {'yes' if r['same'] else 'NO'} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_skins", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--inference_rows", type=int, default=16, help="rows generated (2 images each, 128 px)")
    parser.add_argument(
        "--one_process_threads", choices=("all", "1"), default="all",
        help="threads of the 1-process runs (torch, OCR): all cores (a user's default), or 1 as each of the 2 "
        "processes has (then inference's bytes match too: torch's CPU kernels round by thread count)",
    )
    parser.add_argument("--stages", nargs="+", default=["merge", "glyph", "canny", "caption", "inference", "evaluate",
                                                          "filter"])  # fmt: skip
    args = parser.parse_args()
    with os.popen("uptime") as load:
        print(f"load before: {load.read().strip()}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="bench_multiprocess_"))
    skins = tmp / "skins"
    make_synthetic_skins.make_synthetic_skins(skins, args.num_skins, 0)
    one_thread = {**ENV, "OMP_NUM_THREADS": "1"}
    env1 = one_thread if args.one_process_threads == "1" else ENV
    ocr_threads_1 = 1 if args.one_process_threads == "1" else -1
    results = []
    base = tmp / "merged"
    merge_argv = lambda n, out: ["--packages_dir", str(skins), "--layout", "key_elements",  # noqa: E731
                                 "--resolution", str(args.resolution), "--output_dir", str(out), "--num_workers", str(n)]
    subprocess.run(command("merge_elements.py", merge_argv(1, base), 1), env=ENV, cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    if "merge" in args.stages:
        folders = {n: tmp / f"merge_{n}" for n in (1, 2)}
        results.append(compare("merge_elements", args.num_skins, "merge_elements.py", merge_argv, folders,
                               lambda f: tree_bytes(f, ["train.jsonl"]), label="workers"))  # fmt: skip

    def copies(name: str, source: Path) -> dict[int, Path]:
        out = {}
        for n in (1, 2):
            out[n] = tmp / f"{name}_{n}"
            shutil.copytree(source, out[n])
        return out

    rows_and_images = lambda f: tree_bytes(f)  # noqa: E731
    glyph_argv = lambda threads: lambda n, d: ["--dataset_dir", str(d), "--mode", "glyph",  # noqa: E731
                                                "--ocr_num_threads", str(threads(n))]
    if "glyph" in args.stages:
        results.append(compare("render_glyphs glyph", args.num_skins, "render_glyphs.py",
                               glyph_argv(lambda n: ocr_threads_1 if n == 1 else 1), copies("glyph", base),
                               rows_and_images, env1=env1, env2=one_thread))  # fmt: skip
        worker_argv = lambda n, d: [*glyph_argv(lambda n: 1)(n, d), "--num_workers", str(n)]  # noqa: E731
        results.append(compare("render_glyphs glyph", args.num_skins, "render_glyphs.py", worker_argv,
                               copies("glyph_workers", base), rows_and_images, label="workers"))  # fmt: skip
    glyphed = tmp / "glyph_1"  # the dataset with glyph controls, boxes and texts
    if not glyphed.is_dir():
        shutil.copytree(base, glyphed)
        subprocess.run(command("render_glyphs.py", glyph_argv(lambda n: -1)(1, glyphed), 1),
                       env=ENV, cwd=REPO, check=True, capture_output=True)  # fmt: skip
    if "canny" in args.stages:
        canny_argv = lambda n, d: ["--dataset_dir", str(d), "--mode", "canny", "--output_column",  # noqa: E731
                                   "conditioning_image_canny"]
        results.append(compare("render_glyphs canny", args.num_skins, "render_glyphs.py", canny_argv,
                               copies("canny", glyphed), rows_and_images, env1=env1, env2=one_thread))  # fmt: skip
    caption_argv = lambda n, d: ["--dataset_dir", str(d), "--captioner", "template"]  # noqa: E731
    captioned = tmp / "captioned"
    shutil.copytree(glyphed, captioned)
    subprocess.run(command("caption.py", caption_argv(1, captioned), 1), env=ENV, cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    if "caption" in args.stages:
        results.append(compare("caption template", args.num_skins, "caption.py", caption_argv,
                               copies("caption", glyphed), rows_and_images, env1=env1, env2=one_thread))  # fmt: skip
    if "caption_blip" in args.stages:  # BLIP's cost per image (random weights, a small BLIP's shapes)
        from skingen.testing.tiny_blip import build_random_blip

        blip = build_random_blip(tmp / "blip_small", preset="small")
        blip_argv = lambda n, d: ["--dataset_dir", str(d), "--captioner", "blip", "--model", str(blip),  # noqa: E731
                                  "--batch_size", "4", "--max_new_tokens", "20"]
        results.append(compare("caption BLIP (small, random)", args.num_skins, "caption.py", blip_argv,
                               copies("caption_blip", glyphed), rows_and_images, env1=env1, env2=one_thread))  # fmt: skip
    if {"inference", "evaluate"} & set(args.stages):
        from skingen.testing.tiny_sdxl import build_tiny_sdxl

        tiny = tmp / "tiny_sdxl"
        build_tiny_sdxl(tiny, preset="tiny", seed=0, controlnet=True)
        infer_argv = lambda n, out: ["--pretrained_model_name_or_path", str(tiny), "--controlnet",  # noqa: E731
                                     str(tiny / "controlnet"), "--dataset_dir", str(captioned), "--output_dir",
                                     str(out), "--resolution", "128", "--num_inference_steps", "4",
                                     "--num_images_per_prompt", "2", "--batch_size", "2",
                                     "--max_samples", str(args.inference_rows)]
        folders = {n: tmp / f"generated_{n}" for n in (1, 2)}
        result = compare("inference (tiny SDXL, 128 px, 4 steps)", 2 * args.inference_rows, "inference.py",
                         infer_argv, folders, tree_bytes, env1=env1, env2=one_thread)  # fmt: skip
        if "inference" in args.stages:
            results.append(result)
        if "evaluate" in args.stages:
            eval_argv = lambda n, out: ["--results_dir", str(folders[1]), "--output_dir", str(out)]  # noqa: E731
            metrics = {n: tmp / f"metrics_{n}" for n in (1, 2)}
            results.append(compare("evaluate (edges + RapidOCR)", 2 * args.inference_rows, "evaluate.py", eval_argv,
                                   metrics, tree_bytes, env1=env1, env2=one_thread, resumes=False))  # fmt: skip
            worker_argv = lambda n, out: [*eval_argv(n, out), "--num_workers", str(n)]  # noqa: E731
            metrics = {n: tmp / f"metrics_workers_{n}" for n in (1, 2)}
            results.append(compare("evaluate (edges + RapidOCR)", 2 * args.inference_rows, "evaluate.py",
                                   worker_argv, metrics, tree_bytes, label="workers", resumes=False))  # fmt: skip
    if "filter" in args.stages:
        filter_argv = lambda n, out: ["--dataset_dir", str(captioned), "--num_workers", str(n),  # noqa: E731
                                      "--report_dir", str(out), "--output_jsonl", str(out / "kept.jsonl")]
        results.append(compare("filter_dataset", args.num_skins, "scripts/filter_dataset.py", filter_argv,
                               {n: tmp / f"filter_{n}" for n in (1, 2)}, tree_bytes, label="workers"))  # fmt: skip
    with os.popen("uptime") as load:
        print(f"load after: {load.read().strip()}", file=sys.stderr)
    print("| stage | rows | runs | seconds (1 / 2) | start-up s (1 / 2) | work s (1 / 2) | speed-up | "
          "work speed-up | same bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        print(row_line(result))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
