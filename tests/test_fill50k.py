"""scripts/make_fill50k.py: deterministic, resumable, and its rows load through the dataset loader."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from repo_scripts import REPO, load_script

from skingen.data.dataset import load_skin_dataset
from skingen.errors import SkingenError

SCRIPT = REPO / "scripts" / "make_fill50k.py"


@pytest.fixture(scope="module")
def fill50k():
    return load_script("scripts/make_fill50k.py")


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path, fill50k):
    fill50k.main(["--out", str(tmp_path / "a"), "--n", "12", "--resolution", "32", "--seed", "5"])
    fill50k.main(["--out", str(tmp_path / "b"), "--n", "12", "--resolution", "32", "--seed", "5"])
    fill50k.main(["--out", str(tmp_path / "c"), "--n", "12", "--resolution", "32", "--seed", "6"])
    a, b, c = digests(tmp_path / "a"), digests(tmp_path / "b"), digests(tmp_path / "c")
    assert a == b
    assert len([k for k in a if k.startswith("images/")]) == 12
    assert a["train.jsonl"] != c["train.jsonl"]
    assert not [p for p in (tmp_path / "a").rglob("*.tmp")]


def test_rows_load_through_the_loader_and_match_captions(tmp_path, fill50k):
    out = tmp_path / "fill"
    fill50k.main(["--out", str(out), "--n", "8", "--resolution", "64", "--seed", "0"])
    ds = load_skin_dataset(out)
    assert len(ds) == 8
    for row in ds:
        circle, background = row["text"].removesuffix(" background").split(" circle with ")
        index = int(Path(row["row_id"]).stem)
        x0, y0, x1, y1 = fill50k.sample_spec(index, 64, 0)["bounds"]
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        assert row["image"].size == (64, 64)
        assert row["image"].getpixel((cx, cy)) == fill50k.COLOURS[circle]
        assert row["image"].getpixel((0, 0)) == fill50k.COLOURS[background]  # a corner is never inside the circle
        # Conditioning: white outline on black, nothing inside the circle.
        cond = row["conditioning_image"]
        assert cond.getpixel((cx, cy)) == (0, 0, 0) and cond.getpixel((0, 0)) == (0, 0, 0)
        assert any(cond.getpixel((x, cy)) == (255, 255, 255) for x in range(max(0, int(x0) - 1), int(x0) + 3))


def test_rerun_resumes_and_recreates_only_missing_samples(tmp_path, fill50k, capsys):
    out = tmp_path / "fill"
    args = ["--out", str(out), "--n", "10", "--resolution", "32", "--seed", "1"]
    fill50k.main(args)
    complete = digests(out)
    # A killed run: some images missing, no train.jsonl yet.
    (out / "images" / "3.png").unlink()
    (out / "conditioning_images" / "7.png").unlink()
    (out / "train.jsonl").unlink()
    capsys.readouterr()
    fill50k.main(args)
    assert "2 made now, 8 already there" in capsys.readouterr().out
    assert digests(out) == complete


def test_other_settings_in_same_folder_are_refused(tmp_path, fill50k):
    out = tmp_path / "fill"
    fill50k.main(["--out", str(out), "--n", "2", "--resolution", "32"])
    with pytest.raises(SkingenError, match="was made with --resolution 32 \\(now 64\\)"):
        fill50k.main(["--out", str(out), "--n", "2", "--resolution", "64"])
    # Growing the dataset with the same settings is fine.
    fill50k.main(["--out", str(out), "--n", "4", "--resolution", "32"])
    assert len((out / "train.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "fill50k.json").read_text())["n"] == 4


def test_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "f"), "--n", "3", "--resolution", "16"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "3 samples at 16px" in result.stdout
    assert Image.open(tmp_path / "f" / "images" / "2.png").size == (16, 16)
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "g"), "--n", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "error: --n must be at least 1" in bad.stderr
