"""Bad inputs beyond single rows, per stage: datasets with no rows, images that only a full decode catches,
operating-system errors on the user's paths (full disk, read-only, permission, a file where a folder should be),
leftovers of killed runs, failed checkpoint saves. Scripts run in-process through run_cli, as from the shell:
``error: <path>: <reason>; <fix>``, exit status 2, no traceback, inputs unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from repo_scripts import load_script

from skingen import fileio
from skingen.data.dataset import load_skin_dataset, read_rows, write_rows
from skingen.errors import SkingenError, describe_os_error, run_cli

SCRIPTS = {
    name: load_script(f"{name}.py") for name in ("caption", "render_glyphs", "dataset_tool", "inference", "evaluate")
}
SIZE = (32, 16)
QUAD = [[2, 2], [20, 2], [20, 8], [2, 8]]


def row(i: int, **changes) -> dict:
    return {
        "text": f'a skin {i}, iflyskin, writing "前往"',
        "image": f"images/{i}.png",
        "conditioning_image": f"conditioning_images/{i}.png",
        "box": [QUAD],
        "texts": ["前往"],
        **changes,
    }


def make_dataset(root: Path, n: int = 3, stage: str = "") -> Path:
    """A finished dataset; for a stage that makes a field (caption, conditioning images), the rows as that stage
    finds them."""
    for folder in ("images", "conditioning_images"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.new("RGB", SIZE).save(root / "conditioning_images" / f"{i}.png")
    rows = [row(i) for i in range(n)]
    for entry in rows:
        if stage == "caption":
            entry["text"] = ""
        if stage in ("render_glyphs", "reference"):
            del entry["conditioning_image"]
    write_rows(root, rows)
    return root


def digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def run(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        run_cli(SCRIPTS[script].main, [str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def generated_dir(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "generated"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", SIZE, (9, 9, 9)).save(folder / f"{i}.png")
    return folder


def stage_argv(stage: str, root: Path, tmp_path: Path) -> tuple[str, list]:
    return {
        "caption": ("caption", ["--dataset_dir", root, "--captioner", "template"]),
        "render_glyphs": ("render_glyphs", ["--dataset_dir", root, "--mode", "canny"]),
        "reference": (
            "render_glyphs",
            ["--dataset_dir", root, "--mode", "reference", "--reference_image", root / "images/0.png"],
        ),
        "validate": ("dataset_tool", ["validate", root]),
        "convert": ("dataset_tool", ["convert", root, tmp_path / "converted", "--to", "imagefolder"]),
        "split": ("dataset_tool", ["split", root, "--val_fraction", "0.5"]),
        "inference": (
            "inference",
            [
                "--pretrained_model_name_or_path",
                tmp_path / "m",
                "--controlnet",
                tmp_path / "c",
                "--dataset_dir",
                root,
                "--output_dir",
                tmp_path / "out",
            ],
        ),  # fmt: skip
        "evaluate": (
            "evaluate",
            ["--dataset_dir", root, "--images_dir", tmp_path / "generated", "--ocr_backend", "none"],
        ),
    }[stage]


STAGES = ("caption", "render_glyphs", "reference", "validate", "convert", "split", "inference", "evaluate")


# ---------------------------------------------------------------------------------------------------------------
# No rows


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty file", "blank lines"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_dataset_with_no_rows_stops_every_stage(stage, content, tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n=1)
    (root / "train.jsonl").write_text(content)
    generated_dir(tmp_path)
    before = digest(tmp_path)
    script, argv = stage_argv(stage, root, tmp_path)
    code, out, err = run(script, argv, capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err
    assert f"{root / 'train.jsonl'}: no rows" in err, err
    assert digest(tmp_path) == before


@pytest.mark.parametrize("stage", STAGES)
def test_a_missing_dataset_folder_is_named(stage, tmp_path, capsys):
    generated_dir(tmp_path)
    script, argv = stage_argv(stage, tmp_path / "nope", tmp_path)
    if stage == "reference":
        argv[argv.index("--reference_image") + 1] = tmp_path / "generated" / "0.png"
    code, _, err = run(script, argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert str(tmp_path / "nope") in err and ("not found" in err or "dataset folder" in err), err


def test_a_missing_reference_image_is_named(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n=1)
    before = digest(tmp_path)
    code, _, err = run(
        "render_glyphs",
        ["--dataset_dir", root, "--mode", "reference", "--reference_image", tmp_path / "ref.png"],
        capsys,
    )
    assert code == 2 and f"--reference_image: image {tmp_path / 'ref.png'} not found" in err
    (tmp_path / "ref.png").write_text("text")
    before = digest(tmp_path)
    code, _, err = run(
        "render_glyphs",
        ["--dataset_dir", root, "--mode", "reference", "--reference_image", tmp_path / "ref.png"],
        capsys,
    )
    assert code == 2 and "ref.png is not a readable image" in err
    assert digest(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# Images that only a full decode catches


def truncated_png(path: Path) -> None:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncated_jpeg(path: Path) -> None:
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (128, 256, 3), dtype=np.uint8)).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_validate_decodes_every_image_and_lists_all_problems_at_once(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n=6)
    truncated_png(root / "images" / "1.png")
    truncated_png(root / "conditioning_images" / "2.png")
    truncated_jpeg(root / "images" / "3.jpg")
    png_header_only(root / "images" / "4.png", 12000, 9000)  # 108 Mpx: over Pillow's limit, under its hard limit
    rows = read_rows(root)
    rows[3]["image"] = "images/3.jpg"
    rows[5]["box"] = [[[1, 1]] * 4]
    write_rows(root, rows)
    before = digest(tmp_path)
    code, out, err = run("dataset_tool", ["validate", root], capsys)
    assert code == 1 and "Traceback" not in err
    listed = {text.split(": ", 1)[0].rsplit(":", 1)[-1]: text for text in out.splitlines() if "train.jsonl:" in text}
    assert sorted(listed) == ["2", "3", "4", "5", "6"], out
    assert "'image' file 'images/1.png' does not decode" in listed["2"]
    assert "'conditioning_image' file 'conditioning_images/2.png' does not decode" in listed["3"]
    assert "'image' file 'images/3.jpg' does not decode" in listed["4"]
    assert "'image' file 'images/4.png' has too many pixels for a training image" in listed["5"]
    assert "box 1 [[1, 1], [1, 1], [1, 1], [1, 1]] has an area of 0" in listed["6"]
    assert "rows: 6   ok: 1   bad: 5" in out
    assert digest(tmp_path) == before


def test_a_bomb_past_the_hard_limit_is_refused_by_every_row_reader(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n=2)
    png_header_only(root / "images" / "1.png", 20000, 20000)  # 400 Mpx in a few bytes
    generated_dir(tmp_path)
    for stage in ("caption", "render_glyphs", "convert", "evaluate"):
        script, argv = stage_argv(stage, root, tmp_path)
        code, _, err = run(script, argv, capsys)
        assert code == 2 and "Traceback" not in err, (stage, err)
        assert f"{root / 'train.jsonl'}:2: 'image' file 'images/1.png' has too many pixels" in err, (stage, err)
        assert "exceeds limit" in err


def test_training_loader_names_an_image_truncated_after_the_check(tmp_path):
    root = make_dataset(tmp_path / "ds", n=2)
    dataset = load_skin_dataset(root)
    truncated_png(root / "images" / "1.png")
    with pytest.raises(SkingenError, match=r"images/1.png: does not decode .*dataset_tool.py validate"):
        dataset[1]["image"]


# ---------------------------------------------------------------------------------------------------------------
# Operating-system errors on the user's paths


def fail_fsync(monkeypatch, code: int, message: str) -> None:
    """The disk refuses the data at fsync, as a full disk or a file system remounted read-only does."""

    def refuse(fd):
        raise OSError(code, message)

    monkeypatch.setattr(os, "fsync", refuse)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


@pytest.mark.parametrize(
    ("stage", "code_", "reason", "fix"),
    [
        ("caption", errno.ENOSPC, "No space left on device", "free some space"),
        ("render_glyphs", errno.EROFS, "Read-only file system", "writable disk"),
        ("reference", errno.EDQUOT, "Disk quota exceeded", "free some space"),
        ("split", errno.EIO, "Input/output error", "check the disk"),
        ("evaluate", errno.ENOSPC, "No space left on device", "free some space"),
    ],
)
def test_a_refused_write_names_the_file_and_keeps_the_inputs(stage, code_, reason, fix, tmp_path, capsys, monkeypatch):
    root = make_dataset(tmp_path / "ds", stage=stage)
    generated_dir(tmp_path)
    script, argv = stage_argv(stage, root, tmp_path)
    before = digest(root)
    fail_fsync(monkeypatch, code_, reason)
    code, _, err = run(script, argv, capsys)
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith(f"error: {tmp_path}") and f": {reason}; " in last and fix in last, err
    assert digest(root) == before and no_temp_files(tmp_path)


def test_permission_denied_names_the_folder(tmp_path, capsys, monkeypatch):
    root = make_dataset(tmp_path / "ds", stage="render_glyphs")
    before = digest(root)
    real_mkstemp = fileio.tempfile.mkstemp

    def denied(*args, dir=None, **kwargs):
        if Path(dir).name == "conditioning_images":
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, ".x.tmp"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", denied)
    code, _, err = run("render_glyphs", ["--dataset_dir", root, "--mode", "canny"], capsys)
    assert code == 2
    assert err == (
        f"error: {root / 'conditioning_images' / 'settings.json'}: Permission denied; "
        "make the folder writable for this user or choose another path\n"
    )
    assert digest(root) == before


@pytest.mark.parametrize("stage", ["convert", "split_out", "evaluate", "render_glyphs"])
def test_a_file_where_a_folder_should_be(stage, tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", stage=stage)
    generated_dir(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    if stage == "convert":
        script, argv = "dataset_tool", ["convert", root, blocker / "out", "--to", "jsonl"]
    elif stage == "split_out":
        script, argv = "dataset_tool", ["split", root, "--out", blocker / "out"]
    elif stage == "evaluate":
        script, argv = stage_argv("evaluate", root, tmp_path)
        argv += ["--output_dir", blocker / "metrics"]
    else:
        (root / "conditioning_images" / "0.png").unlink()
        (root / "conditioning_images" / "1.png").unlink()
        (root / "conditioning_images" / "2.png").unlink()
        (root / "conditioning_images").rmdir()
        (root / "conditioning_images").write_text("not a folder")
        script, argv = stage_argv("render_glyphs", root, tmp_path)
    before = digest(tmp_path)
    code, _, err = run(script, argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    where = root / "conditioning_images" if stage == "render_glyphs" else blocker
    assert f"error: {where}" in err, err
    assert (
        "File exists; it is a file where a folder is needed" in err
        or "Not a directory; a part of this path is a file, not a folder" in err
    ), err
    assert digest(tmp_path) == before


def test_inference_output_folder_that_cannot_be_made(tiny_sdxl_dir, tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n=1)
    (tmp_path / "a_file").write_text("x")
    argv = [
        "--pretrained_model_name_or_path", tiny_sdxl_dir, "--controlnet", tiny_sdxl_dir / "controlnet",
        "--dataset_dir", root, "--output_dir", tmp_path / "a_file" / "out", "--num_inference_steps", "1",
        "--resolution", "32", "--device", "cpu",
    ]  # fmt: skip
    before = digest(root)
    code, _, err = run("inference", argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"error: {tmp_path / 'a_file'}" in err and "Not a directory" in err, err
    assert digest(root) == before


def test_os_error_messages():
    assert describe_os_error(OSError(errno.EACCES, "Permission denied", "/data/out")) == (
        "/data/out: Permission denied; make the folder writable for this user or choose another path"
    )
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device")).startswith(
        "No space left on device; free some space"
    )
    assert describe_os_error(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")) == (
        "/a -> /b: Invalid cross-device link; check the path and its permissions, then rerun"
    )


# ---------------------------------------------------------------------------------------------------------------
# Leftovers and lost work


def test_temp_files_of_a_killed_run_are_removed_on_the_next_run(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    (root / "conditioning_images" / ".0.png.k3j2h1.tmp").write_bytes(b"half an image")
    (root / "conditioning_images" / "sub").mkdir()
    (root / "conditioning_images" / "sub" / ".1.png.abc.tmp").write_bytes(b"half")
    (root / ".train.jsonl.q9w8.tmp").write_text('{"half": ')
    code, out, err = run("render_glyphs", ["--dataset_dir", root, "--mode", "canny"], capsys)
    assert code == 0, err
    assert "removed 3 temp file(s) left by an interrupted run" in out
    assert no_temp_files(root)
    (root / ".train.jsonl.zz.tmp").write_text("{")
    code, _, err = run("caption", ["--dataset_dir", root, "--captioner", "template", "--overwrite"], capsys)
    assert code == 0, err
    assert no_temp_files(root)


class CrashingCaptioner:
    """Dies (no KeyboardInterrupt handler runs, as with kill -9) at its ``crash_at``-th batch."""

    def __init__(self, crash_at: int):
        self.crash_at, self.calls = crash_at, 0

    def caption(self, images):
        self.calls += 1
        if self.calls == self.crash_at:
            raise SystemError("killed")
        return ["a described skin"] * len(images)


def test_a_killed_caption_run_redoes_at_most_one_batch(tmp_path, capsys, monkeypatch):
    """Default flags: each batch of 8 is kept as a part file, so a kill loses only the batch in flight."""
    root = make_dataset(tmp_path / "ds", n=20, stage="caption")
    caption = SCRIPTS["caption"]
    monkeypatch.setattr(caption, "build_captioner", lambda *args, **kwargs: CrashingCaptioner(crash_at=3))
    with pytest.raises(SystemError):
        caption.main(["--dataset_dir", str(root), "--captioner", "template"])
    assert no_temp_files(root)
    rerun = CrashingCaptioner(crash_at=0)
    monkeypatch.setattr(caption, "build_captioner", lambda *args, **kwargs: rerun)
    caption.main(["--dataset_dir", str(root), "--captioner", "template"])
    assert rerun.calls == 1  # only the 4 rows of the batch in flight
    assert all(entry["text"] for entry in read_rows(root))


def test_caption_warns_once_about_texts_left_out_of_the_caption(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n=2)
    quads = [[[x, 2], [x + 3, 2], [x + 3, 8], [x, 8]] for x in range(0, 30, 4)]
    write_rows(root, [row(i, text="", box=quads, texts=[f"t{k}" for k in range(len(quads))]) for i in range(2)])
    code, _, err = run(
        "caption", ["--dataset_dir", root, "--captioner", "template", "--max_writing_texts", "3"], capsys
    )
    assert code == 0
    warnings = [text for text in err.splitlines() if text.startswith("warning:")]
    assert warnings == [
        "warning: 2 caption(s) name only their 3 largest texts (--max_writing_texts); "
        "10 text(s) left out of writing \"...\" (kept in 'texts')"
    ]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_checkpoint_save_that_runs_out_of_space_keeps_the_previous_one(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from skingen.train.checkpoints import list_checkpoints, resolve_resume_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]))
    save_checkpoint(accelerator, tmp_path, 1, {"global_step": 1}, total_limit=None)
    saved = digest(tmp_path / "checkpoint-1")

    def disk_full(output_dir, **kwargs):
        (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
            "PytorchStreamWriter failed writing file data/0: file write failed"
        )

    monkeypatch.setattr(accelerator, "save_state", disk_full)
    with pytest.raises(SkingenError) as info:
        save_checkpoint(accelerator, tmp_path, 2, {"global_step": 2}, total_limit=None)
    assert f"{tmp_path / 'checkpoint-2'}: the checkpoint could not be written" in str(info.value)
    assert "file write failed" in str(info.value) and "previous checkpoints are kept" in str(info.value)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert digest(tmp_path / "checkpoint-1") == saved
    assert resolve_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"

    # The safetensors writer reports a full disk in its own error type: the same message, nothing lost.
    from safetensors import SafetensorError

    def safetensors_disk_full(output_dir, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(accelerator, "save_state", safetensors_disk_full)
    with pytest.raises(SkingenError) as info:
        save_checkpoint(accelerator, tmp_path, 2, {"global_step": 2}, total_limit=None)
    assert f"{tmp_path / 'checkpoint-2'}: the checkpoint could not be written: no space left on device; previous " \
        "checkpoints are kept" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert digest(tmp_path / "checkpoint-1") == saved

    # The data of a published checkpoint reached the disk before its rename.
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    monkeypatch.setattr(
        accelerator, "save_state", lambda output_dir, **kw: (Path(output_dir) / "w.bin").write_bytes(b"w")
    )
    save_checkpoint(accelerator, tmp_path, 3, {"global_step": 3}, total_limit=None)
    assert any(path.endswith("w.bin") for path in synced) and any(
        path.endswith("training_state.json") for path in synced
    )
    assert str(tmp_path) in synced  # the parent folder after the rename


def test_resuming_is_refused_without_safe_loading(tmp_path, monkeypatch):
    from skingen.train.checkpoints import resolve_resume_checkpoint

    (tmp_path / "checkpoint-5" / "controlnet").mkdir(parents=True)
    monkeypatch.setattr(torch, "__version__", "2.3.1+cpu")
    with pytest.raises(SkingenError, match=r"cannot load checkpoints safely \(weights_only needs torch >= 2.4\)"):
        resolve_resume_checkpoint(tmp_path, "latest")
    with pytest.raises(SkingenError, match="weights_only"):
        resolve_resume_checkpoint(tmp_path, "checkpoint-5")
    assert resolve_resume_checkpoint(tmp_path / "fresh", "latest") is None  # nothing to load: a first run starts


def test_ocr_lines_the_rows_could_not_use_are_dropped_and_counted():
    from skingen.prep.glyphs import GlyphCounts, keep_ocr_lines
    from skingen.prep.ocr import TextLine

    lines = [
        TextLine([[2, 2], [20, 2], [20, 8], [2, 8]], "前往", 0.99),
        TextLine([[2, 2], [20, 2], [20, 8], [2, 8]], "搜索", 0.50),  # not sure enough
        TextLine([[2, 2], [20, 2], [20, 8], [2, 8]], "  ", 0.99),  # nothing to draw
        TextLine([[5, 5], [5, 5], [5, 5], [5, 5]], "点", 0.99),  # no area
        TextLine([[2, 2], [90, 2], [90, 8], [2, 8]], "外", 0.99),  # past the 32x16 image
    ]
    counts = GlyphCounts()
    kept = keep_ocr_lines(lines, SIZE, 0.98, counts)
    assert [line.text for line in kept] == ["前往"]
    assert (counts.found, counts.kept, counts.low_score, counts.unusable_box) == (5, 1, 2, 2)
    keep_ocr_lines(lines[1:2], SIZE, 0.98, counts)
    assert counts.rows_without_text == 1


def test_validate_checks_the_validation_split_too(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n=3)
    write_rows(root, [row(2, box=[[[0, 0], [99, 0], [99, 5], [0, 5]]])], split="validation")
    write_rows(root, [row(0), row(1)])
    code, out, _ = run("dataset_tool", ["validate", root], capsys)
    assert code == 1
    assert f"{root / 'validation.jsonl'}:1: box 1 point (99, 0) lies outside the 32x16 image" in out
    assert f"{root / 'train.jsonl'}" in out and "rows: 2   ok: 2   bad: 0" in out


def test_inference_removes_the_temp_files_of_a_killed_run(tiny_sdxl_dir, tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n=1)
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / ".images_0_s0.png.x1y2.tmp").write_bytes(b"half an image")
    (out / ".results.jsonl.a1b2.tmp").write_text('{"out')
    argv = [
        "--pretrained_model_name_or_path", tiny_sdxl_dir, "--controlnet", tiny_sdxl_dir / "controlnet",
        "--dataset_dir", root, "--output_dir", out, "--num_inference_steps", "1", "--resolution", "32",
        "--device", "cpu",
    ]  # fmt: skip
    code, _, err = run("inference", argv, capsys)
    assert code == 0, err
    assert no_temp_files(out) and (out / "results.jsonl").is_file()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_training_output_folder_that_cannot_be_made(tiny_sdxl_dir, tmp_path, capsys):
    from repo_scripts import tiny_training_argv

    root = make_dataset(tmp_path / "ds", n=2)
    (tmp_path / "a_file").write_text("x")
    before = digest(root)
    trainer = load_script("train_controlnet_sdxl.py")
    argv = tiny_training_argv(tiny_sdxl_dir, root, tmp_path / "a_file" / "run", "--max_train_steps", "1")
    try:
        run_cli(trainer.main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"error: {tmp_path / 'a_file' / 'run'}: Not a directory; a part of this path is a file" in err, err
    assert digest(root) == before


# ---------------------------------------------------------------------------------------------------------------
# The trainer, end to end from its command line


def train_sdxl(base: Path, dataset: Path, out: Path, capsys, *extra) -> tuple[int, str, str]:
    script = load_script("train_controlnet_sdxl.py")
    argv = ["--pretrained_model_name_or_path", base, "--train_data_dir", dataset, "--output_dir", out,
            "--resolution", 32, "--train_batch_size", 1, "--seed", 0, "--report_to", "none", *extra]
    try:
        run_cli(script.main, [str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out_text, err = capsys.readouterr()
    return code, out_text, err


@pytest.mark.usefixtures("fresh_accelerate_state", "one_torch_thread")
@pytest.mark.parametrize("latents", ["--cache_latents", "--no_cache_latents"])
def test_training_names_the_row_of_an_image_that_does_not_decode(tiny_sdxl_dir, tmp_path, capsys, latents):
    """While caching latents, or in the first steps when images are encoded at each step: one error line of its
    own (the progress bar is closed first), naming the row and the image."""
    root = make_dataset(tmp_path / "ds", n=3)
    truncated_png(root / "images" / "1.png")  # its header reads, so the rows check passes; the pixels do not
    before = digest(root)
    code, _, err = train_sdxl(tiny_sdxl_dir, root, tmp_path / "out", capsys, "--max_train_steps", 3, latents)
    assert code == 2 and "Traceback" not in err, err
    assert f"error: {root / 'train.jsonl'}:2: images/1.png: does not decode (" in err
    assert "dataset_tool.py validate" in err and sum(line.startswith("error:") for line in err.splitlines()) == 1
    assert digest(root) == before


@pytest.mark.usefixtures("fresh_accelerate_state", "one_torch_thread")
def test_a_full_disk_in_the_safetensors_writer_ends_in_one_error_and_the_run_resumes(tiny_sdxl_dir, tmp_path,
                                                                                     capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    root = make_dataset(tmp_path / "ds", n=2)
    out = tmp_path / "out"
    code, _, err = train_sdxl(tiny_sdxl_dir, root, out, capsys, "--max_train_steps", 1, "--checkpointing_steps", 1)
    assert code == 0, err
    saved = digest(out / "checkpoint-1")

    def disk_full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    code, _, err = train_sdxl(tiny_sdxl_dir, root, out, capsys, "--max_train_steps", 2, "--checkpointing_steps", 1,
                              "--resume_from_checkpoint", "latest")
    assert code == 2 and "Traceback" not in err, err
    assert f"error: {out / 'checkpoint-2'}: the checkpoint could not be written: no space left on device; " \
        "previous checkpoints are kept" in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == \
        ["checkpoint-1"]
    assert digest(out / "checkpoint-1") == saved

    monkeypatch.undo()
    code, _, err = train_sdxl(tiny_sdxl_dir, root, out, capsys, "--max_train_steps", 2, "--checkpointing_steps", 1,
                              "--resume_from_checkpoint", "latest")
    assert code == 0, err
    assert (out / "checkpoint-2").is_dir() and (out / "diffusion_pytorch_model.safetensors").is_file()


def test_a_reader_that_closes_the_pipe_is_not_reported_as_an_error_of_the_users_paths():
    """`script.py | head -1`: head exits after one line; the script stops quietly (status 141, as SIGPIPE)."""
    import subprocess
    import sys

    code = ("from skingen.errors import run_cli\n"
            "def main(argv):\n"
            "    for i in range(200000):\n"
            "        print('line', i)\n"
            "run_cli(main)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()  # the reader goes away, as head does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "error" not in err and "Traceback" not in err, err
