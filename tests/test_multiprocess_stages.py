"""The sharded stages (skingen.sharding) launched on 2 processes give the bytes of a 1-process run, resume
after a kill without doing a row twice, stop every process with the same error line, and --num_workers 2
gives the output of 1 worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launching import LAUNCH_ENV, launch, launch_script
from PIL import Image, ImageDraw
from repo_scripts import REPO, load_script
from textimages import draw_texts

from skingen.data import dataset as data
from skingen.fileio import atomic_write_json
from skingen.skins.layout import load_layout

SIZE = 256
LAYOUT_YAML = """
name: test_bar_and_keys
canvas: [256, 256]
resolutions: [256]
background: [255, 255, 255]
elements:
  - {id: candidate_bar, box: [0, 0, 256, 48], patterns: ["bar*.png"]}
  - {id: key_a, box: [8, 150, 120, 200], patterns: ["key_a*.png"]}
  - {id: key_b, box: [136, 150, 248, 200], patterns: ["key_b*.png"]}
"""
WORDS = ["前往", "搜索", "设置", "Hello", "OK", "返回"]


def make_dataset(root: Path, count: int) -> Path:
    """``count`` skins of the test layout, each with a word or two, as merge_elements.py leaves a folder."""
    (root / "images").mkdir(parents=True)
    layout_path = root.parent / f"{root.name}_layout.yaml"
    layout_path.write_text(LAYOUT_YAML, encoding="utf-8")
    atomic_write_json(root / "layout.json", load_layout(layout_path, resolution=SIZE).to_dict())
    rows = []
    for i in range(count):
        rng = np.random.default_rng(i)
        image = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(40, 120, 3)))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, 255, 47), fill=(30, 60, 110))
        for box in ((8, 150, 119, 199), (136, 150, 247, 199)):
            draw.rounded_rectangle(box, 8, fill=(235, 235, 240))
        texts = [((20, 160), WORDS[i % len(WORDS)], (20, 20, 20))] + ([((150, 10), WORDS[(i + 1) % len(WORDS)], (250, 220, 0))] if i % 2 else [])
        draw_texts(image, texts, font_size=22)
        image.save(root / "images" / f"skin_{i}.png")
        rows.append({"image": f"images/skin_{i}.png", "package": f"skin_{i}", "text": "", "layout": "test_bar_and_keys"})
    data.write_rows(root, rows)
    return root


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path (the layout file beside it excluded)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_tree(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    shutil.copy(source.parent / f"{source.name}_layout.yaml", target.parent / f"{target.name}_layout.yaml")
    return target


def written_keys(count_dir: Path) -> list[str]:
    """Every row key the processes wrote to parts (a key twice: a row done twice)."""
    return [key for path in sorted(count_dir.glob("rank*.json")) for part in json.loads(path.read_text()) for key in part]


# ---------------------------------------------------------------------------------------------------------------
# render_glyphs.py


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 7-row dataset, and the same folder after a 1-process canny run and glyph run (in another column)."""
    tmp = tmp_path_factory.mktemp("prep")
    fresh = make_dataset(tmp / "fresh", 7)
    one = copy_tree(fresh, tmp / "one")
    render = load_script("render_glyphs.py")
    render.main(["--dataset_dir", str(one), "--mode", "glyph", "--batch_size", "2"])
    render.main(["--dataset_dir", str(one), "--mode", "canny", "--output_column", "conditioning_image_canny",
                 "--batch_size", "2"])  # fmt: skip
    return fresh, one


def render_runs(folder: Path, *extra: str) -> list:
    return [
        ["render_glyphs.py", ["--dataset_dir", str(folder), "--mode", "glyph", "--batch_size", "2", *extra]],
        ["render_glyphs.py", ["--dataset_dir", str(folder), "--mode", "canny", "--output_column",
                              "conditioning_image_canny", "--batch_size", "2", *extra]],
    ]  # fmt: skip


def test_render_glyphs_two_processes_write_the_bytes_of_one(prepared, tmp_path):
    fresh, one = prepared
    two = copy_tree(fresh, tmp_path / "two")
    finished = launch(render_runs(two), tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert file_bytes(two) == file_bytes(one)
    assert not (two / ".parts").exists()
    rows = data.read_rows(two)
    assert sum(len(row["texts"]) for row in rows) >= len(rows)  # the OCR found the words: the test shows something
    assert "process 1 of 2:" in finished.stderr  # each process says what it wrote


def test_render_glyphs_killed_run_resumes_without_redoing_a_row(prepared, tmp_path):
    fresh, one = prepared
    two = copy_tree(fresh, tmp_path / "two")
    glyph_run = render_runs(two)[0]
    killed = launch([[*glyph_run, {"count_dir": str(tmp_path / "killed"), "exit_after_parts": 1}]], tmp_path)
    assert killed.returncode != 0
    done_before = written_keys(tmp_path / "killed")
    assert 2 <= len(done_before) < 7 and (two / ".parts").is_dir()

    resumed = launch([[*glyph_run, {"count_dir": str(tmp_path / "resumed")}], render_runs(two)[1]], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done_after = written_keys(tmp_path / "resumed")
    assert sorted(done_before + done_after) == sorted(f"images/skin_{i}.png" for i in range(7))  # each row once
    assert file_bytes(two) == file_bytes(one)


def test_render_glyphs_num_workers_two_equals_one(prepared, tmp_path):
    fresh, one = prepared
    two = copy_tree(fresh, tmp_path / "workers")
    render = load_script("render_glyphs.py")
    for run in render_runs(two, "--num_workers", "2"):
        render.main(run[1])
    assert file_bytes(two) == file_bytes(one)


def break_image(folder: Path, index: int) -> str:
    """Cut row ``index``'s image after its header: the row check passes, decoding it fails mid-run."""
    path = folder / "images" / f"skin_{index}.png"
    path.write_bytes(path.read_bytes()[:200])
    return f"{folder / 'train.jsonl'}:{index + 1}"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_bad_row_stops_every_process_with_the_error_line_of_one(prepared, tmp_path):
    fresh, _ = prepared
    single = copy_tree(fresh, tmp_path / "single")
    double = copy_tree(fresh, tmp_path / "double")
    where = break_image(single, 3), break_image(double, 3)  # row 3 is the second process's (blocks of 2 rows)
    argv = ["--mode", "canny", "--batch_size", "2"]
    one = subprocess.run([sys.executable, str(REPO / "render_glyphs.py"), "--dataset_dir", str(single), *argv],
                         env={**os.environ, **LAUNCH_ENV}, capture_output=True, text=True, timeout=300)  # fmt: skip
    two = launch_script("render_glyphs.py", ["--dataset_dir", str(double), *argv])
    assert one.returncode == 2 and two.returncode != 0
    [line] = error_lines(one.stderr)
    assert where[0] in line
    # Every process that got to print before the launcher stopped the others printed the 1-process line.
    assert set(error_lines(two.stderr)) == {line.replace(str(single), str(double))}
    assert "[rank0]: Traceback" not in two.stderr and "[rank1]: Traceback" not in two.stderr  # no process crashed


# ---------------------------------------------------------------------------------------------------------------
# caption.py


def caption_run(folder: Path) -> list:
    return ["caption.py", ["--dataset_dir", str(folder), "--captioner", "template", "--batch_size", "2"]]


def test_caption_two_processes_write_the_bytes_of_one_and_resume_after_a_kill(prepared, tmp_path):
    _, rendered = prepared
    one = copy_tree(rendered, tmp_path / "one")
    load_script("caption.py").main(caption_run(one)[1])
    two = copy_tree(rendered, tmp_path / "two")
    killed = launch([[*caption_run(two), {"count_dir": str(tmp_path / "killed"), "exit_after_parts": 1}]], tmp_path)
    assert killed.returncode != 0
    done_before = written_keys(tmp_path / "killed")
    assert 2 <= len(done_before) < 7

    resumed = launch([[*caption_run(two), {"count_dir": str(tmp_path / "resumed")}]], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(done_before + written_keys(tmp_path / "resumed")) == sorted(f"images/skin_{i}.png" for i in range(7))
    assert file_bytes(two) == file_bytes(one)
    assert all('writing "' in row["text"] for row in data.read_rows(two))  # the glyph run's texts are named


# ---------------------------------------------------------------------------------------------------------------
# inference.py and evaluate.py


@pytest.fixture(scope="module")
def generated(prepared, tiny_sdxl_dir, tmp_path_factory):
    """The captioned dataset, generated (2 images a row, 64 px) and evaluated by one process."""
    import torch

    _, rendered = prepared
    tmp = tmp_path_factory.mktemp("gen")
    captioned = copy_tree(rendered, tmp / "captioned")
    load_script("caption.py").main(caption_run(captioned)[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process runs (OMP_NUM_THREADS=1)
    try:
        load_script("inference.py").main(inference_argv(tiny_sdxl_dir, captioned, tmp / "one"))
        load_script("evaluate.py").main(evaluate_argv(tmp / "one", tmp / "metrics_one"))
    finally:
        torch.set_num_threads(threads)
    return captioned, tmp / "one", tmp / "metrics_one"


def inference_argv(tiny_sdxl_dir: Path, dataset: Path, output_dir: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--controlnet", str(tiny_sdxl_dir / "controlnet"),
            "--dataset_dir", str(dataset), "--output_dir", str(output_dir), "--resolution", "64",
            "--num_inference_steps", "2", "--num_images_per_prompt", "2", "--batch_size", "2", "--seed", "3"]  # fmt: skip


def evaluate_argv(results_dir: Path, output_dir: Path) -> list[str]:
    return ["--results_dir", str(results_dir), "--output_dir", str(output_dir), "--batch_size", "3"]


@pytest.mark.slow
def test_inference_and_evaluate_two_processes_write_the_bytes_of_one(generated, tiny_sdxl_dir, tmp_path):
    captioned, one, metrics_one = generated
    two = tmp_path / "two"
    finished = launch([["inference.py", inference_argv(tiny_sdxl_dir, captioned, two)],
                       ["evaluate.py", evaluate_argv(one, tmp_path / "metrics_two")]], tmp_path)  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert file_bytes(two) == file_bytes(one)
    assert len(list((one / "images").glob("*.png"))) == 14 and len(list((one / "grids").glob("*.png"))) == 7
    assert file_bytes(tmp_path / "metrics_two") == file_bytes(metrics_one)
    report = json.loads((metrics_one / "metrics.json").read_text())
    assert len(report["images"]) == 14 and report["summary"]["text_lines"] > 0  # OCR ran on the text boxes


@pytest.mark.slow
def test_inference_and_evaluate_resume_after_a_kill_without_redoing_an_image(generated, tiny_sdxl_dir, tmp_path):
    captioned, one, metrics_one = generated
    out, metrics = tmp_path / "out", tmp_path / "metrics"
    generate, evaluate = ["inference.py", inference_argv(tiny_sdxl_dir, captioned, out)], ["evaluate.py", evaluate_argv(one, metrics)]
    killed = launch([[*generate, {"count_dir": str(tmp_path / "gen_killed"), "exit_after_parts": 1}]], tmp_path)
    assert killed.returncode != 0
    resumed = launch([[*generate, {"count_dir": str(tmp_path / "gen_resumed")}],
                      [*evaluate, {"count_dir": str(tmp_path / "eval_killed"), "exit_after_parts": 1}]], tmp_path)  # fmt: skip
    assert resumed.returncode != 0  # the evaluation was killed
    resumed_eval = launch([[*evaluate, {"count_dir": str(tmp_path / "eval_resumed")}]], tmp_path, processes=1)
    assert resumed_eval.returncode == 0, resumed_eval.stderr[-3000:]

    before, after = written_keys(tmp_path / "gen_killed"), written_keys(tmp_path / "gen_resumed")
    assert before and after and sorted(before + after) == sorted(json.loads(line)["output"] for line in (one / "results.jsonl").read_text().splitlines())
    evaluated = written_keys(tmp_path / "eval_killed") + written_keys(tmp_path / "eval_resumed")
    assert len(evaluated) == len(set(evaluated)) == 14
    assert file_bytes(out) == file_bytes(one)
    assert file_bytes(metrics) == file_bytes(metrics_one)


def test_evaluate_num_workers_two_equals_one(generated, tmp_path):
    _, one, metrics_one = generated
    load_script("evaluate.py").main([*evaluate_argv(one, tmp_path / "metrics"), "--num_workers", "2"])
    assert file_bytes(tmp_path / "metrics") == file_bytes(metrics_one)


def test_filter_num_workers_two_equals_one(prepared, tmp_path):
    fresh, _ = prepared
    dataset = copy_tree(fresh, tmp_path / "ds")
    (dataset / "images" / "skin_6.png").write_bytes((dataset / "images" / "skin_0.png").read_bytes())  # a duplicate
    script = load_script("scripts/filter_dataset.py")
    reports = {}
    for workers in ("1", "2"):
        script.main(["--dataset_dir", str(dataset), "--num_workers", workers, "--report_dir", str(tmp_path / workers),
                     "--output_jsonl", str(tmp_path / workers / "kept.jsonl")])  # fmt: skip
        reports[workers] = file_bytes(tmp_path / workers)
    assert reports["2"] == reports["1"]
    last = json.loads(reports["1"]["filter_report.json"])["rows"][-1]
    assert last["duplicate_of"] == "images/skin_0.png"  # decided in row order, as with one worker
