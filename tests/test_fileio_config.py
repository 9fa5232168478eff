"""Atomic outputs, line-numbered JSONL errors, and --config handling shared by every script."""

from __future__ import annotations

import argparse
import os
import stat

import pytest
from PIL import Image

from skingen.config import parse_args_with_config
from skingen.errors import SkingenError, run_cli
from skingen.fileio import AtomicDirectory, atomic_save_image, atomic_write_text, read_jsonl, write_jsonl


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out" / "a.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_failed_image_save_keeps_previous_file(tmp_path):
    target = tmp_path / "img.png"
    atomic_save_image(Image.new("RGB", (4, 4), "red"), target)
    with pytest.raises(AttributeError):
        atomic_save_image("not an image", target)  # type: ignore[arg-type]
    assert Image.open(target).getpixel((0, 0)) == (255, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2\n', encoding="utf-8")
    rows = read_jsonl(path)
    assert next(rows) == (1, {"a": 1})
    with pytest.raises(SkingenError, match=r"train\.jsonl:3: invalid JSON"):
        next(rows)


def test_read_jsonl_rejects_non_objects(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(SkingenError, match=r"x\.jsonl:1: expected a JSON object, got list"):
        list(read_jsonl(path))


def test_write_jsonl_keeps_unicode_readable(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": 'writing "前往"'}])
    assert '前往' in path.read_text(encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"text": 'writing "前往"'})]


def test_atomic_directory_keeps_old_version_when_build_fails(tmp_path):
    final = tmp_path / "checkpoint-1"
    with AtomicDirectory(final) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with AtomicDirectory(final) as tmp:
            (tmp / "weights").write_text("v2-partial")
            raise RuntimeError("killed mid-save")
    assert (final / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def _parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    return parser


def test_config_sets_flags_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 2e-5\n--resolution: 512\nmixed-precision: bf16\n")
    args = parse_args_with_config(_parser(), ["--config", str(cfg), "--resolution", "768"])
    assert args.learning_rate == pytest.approx(2e-5)
    assert args.resolution == 768
    assert args.mixed_precision == "bf16"


@pytest.mark.parametrize(
    "content, message",
    [
        ("learning_rat: 1\n", r"unknown setting 'learning_rat' \(did you mean: learning_rate"),
        ("mixed_precision: fp8\n", r"'mixed_precision' must be one of"),
        ("resolution: big\n", r"setting 'resolution'"),
        ("a: [1, 2\n", r"c\.yaml:\d+: invalid YAML"),
        ("- 1\n", r"expected a mapping"),
    ],
)
def test_config_errors_are_clear(tmp_path, content, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    with pytest.raises(SkingenError, match=message):
        parse_args_with_config(_parser(), ["--config", str(cfg)])


def test_run_cli_prints_error_and_exits_2(capsys):
    def main(argv):
        raise SkingenError("data/train.jsonl:4: missing key 'image'")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data/train.jsonl:4: missing key 'image'")
    assert "Traceback" not in err


def test_outputs_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
        with AtomicDirectory(tmp_path / "pkg") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "pkg").stat().st_mode) == 0o755
