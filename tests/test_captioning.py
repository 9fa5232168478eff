"""caption.py and skingen.prep.captioning: BLIP through transformers (a tiny BLIP built offline) and the template captioner."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import caption
from skingen.data.dataset import read_checked_rows, read_rows, write_rows
from skingen.data.rows import CAPTION
from skingen.data.writing import texts_from_caption
from skingen.errors import SkingenError
from skingen.prep.captioning import TemplateCaptioner, caption_rows, compose_caption
from skingen.testing.tiny_blip import WORDS

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a keyboard skin of"
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A BLIP captioning model with random weights and a WordPiece tokenizer, saved like a hub download."""
    from skingen.testing.tiny_blip import build_random_blip

    return build_random_blip(tmp_path_factory.mktemp("tiny_blip"), preset="tiny")


def _make_dataset(folder: Path) -> Path:
    """Three skins as merge_elements.py leaves them: image, package, layout, elements, empty text."""
    (folder / "images").mkdir(parents=True)
    colours = {"red": (220, 30, 30), "navy": (20, 30, 90), "white": (250, 250, 250)}
    rows = []
    for name, rgb in colours.items():
        Image.new("RGB", (64, 64), rgb).save(folder / "images" / f"{name}.png")
        rows.append(
            {
                "image": f"images/{name}.png",
                "package": f"pkg_{name}",
                "layout": "key_elements",
                "elements": [{"id": "bg"}],
                "text": "",
            }
        )
    rows[1]["texts"] = ["前往", "搜索"]
    rows[1]["box"] = [[[1, 1], [20, 1], [20, 9], [1, 9]], [[30, 1], [50, 1], [50, 9], [30, 9]]]
    write_rows(folder, rows)
    return folder


def _caption_blip(dataset: Path, tiny_blip: Path, *extra: str) -> list[dict]:
    flags = ["--dataset_dir", str(dataset), "--model", str(tiny_blip), "--device", "cpu", "--batch_size", "2"]
    caption.main([*flags, "--max_new_tokens", str(NEW_TOKENS), *extra])
    return read_rows(dataset)


def test_blip_captions_every_row_with_prompt_trigger_and_writing(tmp_path, tiny_blip):
    dataset = _make_dataset(tmp_path / "ds")
    before = read_rows(dataset)
    rows = _caption_blip(dataset, tiny_blip)

    pattern = re.compile(rf"^{PROMPT} ((?:\w+ ){{{NEW_TOKENS - 1}}}\w+), iflyskin(, writing \"(.*)\")?$")
    for old, new in zip(before, rows):
        match = pattern.match(new["text"])
        assert match, new["text"]
        assert set(match.group(1).split()) <= set(WORDS)
        assert {k: v for k, v in new.items() if k != "text"} == {k: v for k, v in old.items() if k != "text"}
    assert pattern.match(rows[1]["text"]).group(3) == "前往 搜索"
    assert pattern.match(rows[0]["text"]).group(2) is None
    # The dataset loader reads the same text back out of the caption.
    assert texts_from_caption(rows[1]["text"]) == ["前往 搜索"]


def test_existing_captions_are_kept_unless_overwrite(tmp_path, tiny_blip):
    dataset = _make_dataset(tmp_path / "ds")
    rows = read_rows(dataset)
    rows[0]["text"] = "hand written caption, iflyskin"
    write_rows(dataset, rows)

    kept = _caption_blip(dataset, tiny_blip)
    assert kept[0]["text"] == "hand written caption, iflyskin"
    assert kept[2]["text"].startswith(PROMPT)

    overwritten = _caption_blip(dataset, tiny_blip, "--overwrite", "--trigger_word", "", "--dtype", "bfloat16")
    assert overwritten[0]["text"].startswith(PROMPT)
    assert all("iflyskin" not in row["text"] for row in overwritten)
    assert not (dataset / ".parts").exists()


def test_offline_hub_id_fails_with_a_clear_message(tmp_path):
    dataset = _make_dataset(tmp_path / "ds")
    with pytest.raises(SkingenError, match=r"--model Salesforce/blip-image-captioning-large.*local folder"):
        caption.main(["--dataset_dir", str(dataset), "--model", "Salesforce/blip-image-captioning-large"])
    with pytest.raises(SkingenError, match="folder not found"):
        caption.main(["--dataset_dir", str(dataset), "--model", str(tmp_path / "no_such_blip")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SkingenError, match="empty: not a BLIP model folder"):
        caption.main(["--dataset_dir", str(dataset), "--model", str(tmp_path / "empty")])
    assert all(row["text"] == "" for row in read_rows(dataset))


def test_template_captioner_names_the_dominant_colour_and_is_deterministic(tmp_path):
    dataset = _make_dataset(tmp_path / "ds")
    caption.main(["--dataset_dir", str(dataset), "--captioner", "template"])
    first = [row["text"] for row in read_rows(dataset)]
    caption.main(["--dataset_dir", str(dataset), "--captioner", "template", "--overwrite"])
    assert [row["text"] for row in read_rows(dataset)] == first

    red, navy, white = first
    assert red.startswith(f"{PROMPT} a ") and " red " in red and red.endswith(", iflyskin")
    assert " navy " in navy and "cool tones" in navy and navy.endswith(', iflyskin, writing "前往 搜索"')
    assert " white " in white and "red" not in white


def test_template_captioner_style_words():
    captioner = TemplateCaptioner(prompt="")
    ramp = np.zeros((256, 256, 3), np.uint8)
    ramp[..., 0] = np.linspace(250, 40, 256)[None, :]
    ramp[..., 2] = np.linspace(60, 240, 256)[None, :]
    checker = ((np.indices((256, 256)) // 16).sum(axis=0) % 2 * 255).astype(np.uint8)
    dark = Image.new("RGB", (256, 256), (200, 40, 40))
    dark.paste((15, 15, 15), (0, 0, 256, 200))
    gradient, busy, mostly_black = captioner.caption(
        [Image.fromarray(ramp), Image.fromarray(np.stack([checker] * 3, -1)), dark]
    )
    assert "gradient" in gradient and "flat" not in gradient
    assert "busy pattern" in busy and "black and white" in busy and "high-contrast" in busy
    assert not mostly_black.startswith("a dark") and "black and red" in mostly_black


class ScriptedCaptioner:
    """Describes every image as ``description``; after ``interrupt_after`` calls it raises KeyboardInterrupt,
    as a user's Ctrl-C would in the middle of a run."""

    def __init__(self, description: str, interrupt_after: int | None = None):
        self.description = description
        self.interrupt_after = interrupt_after
        self.calls = 0

    def caption(self, images):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        return [self.description] * len(images)


def test_interrupted_run_resumes_without_recaptioning(tmp_path):
    dataset = _make_dataset(tmp_path / "ds")
    rows = read_checked_rows(dataset, CAPTION)
    save = lambda r: write_rows(dataset, [row.raw for row in r])  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        # The interruption itself saves the finished batch.
        interrupted = ScriptedCaptioner("first description", interrupt_after=1)
        caption_rows(rows, dataset, interrupted, save=save, batch_size=1)
    on_disk = read_rows(dataset)
    assert on_disk[0]["text"] == "first description, iflyskin" and on_disk[1]["text"] == ""

    stats = caption_rows(read_checked_rows(dataset, CAPTION), dataset, TemplateCaptioner(), save=save, batch_size=1)
    assert (stats.captioned, stats.kept) == (2, 1)
    final = read_rows(dataset)
    assert final[0]["text"] == "first description, iflyskin" and all(row["text"] for row in final)


def test_interrupted_overwrite_run_resumes_from_its_part_files(tmp_path):
    dataset = _make_dataset(tmp_path / "ds")
    rows = read_rows(dataset)
    for row in rows:
        row["text"] = "old caption"
    write_rows(dataset, rows)
    save = lambda r: write_rows(dataset, [row.raw for row in r])  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        caption_rows(
            read_checked_rows(dataset, CAPTION),
            dataset,
            ScriptedCaptioner("new", interrupt_after=2),
            save=save,
            overwrite=True,
            batch_size=1,
        )
    assert [row["text"] for row in read_rows(dataset)] == ["new, iflyskin", 'new, iflyskin, writing "前往 搜索"', "old caption"]
    assert len(list((dataset / ".parts" / "caption").glob("part-*.jsonl"))) == 2

    # Resuming captions only the row the interrupted run did not reach.
    resumed = ScriptedCaptioner("newest")
    stats = caption_rows(read_checked_rows(dataset, CAPTION), dataset, resumed, save=save, overwrite=True, batch_size=1)
    assert stats.captioned == 1 and resumed.calls == 1
    assert [row["text"] for row in read_rows(dataset)] == [
        "new, iflyskin",
        'new, iflyskin, writing "前往 搜索"',
        "newest, iflyskin",
    ]
    assert not (dataset / ".parts").exists()
    # The finished run removed its part files: the next --overwrite run captions every row again.
    again = ScriptedCaptioner("again")
    stats = caption_rows(read_checked_rows(dataset, CAPTION), dataset, again, save=save, overwrite=True)
    assert stats.captioned == 3 and all(row["text"].startswith("again") for row in read_rows(dataset))


def test_bad_rows_are_reported_with_the_row(tmp_path):
    dataset = _make_dataset(tmp_path / "ds")
    rows = read_rows(dataset)
    rows[2]["image"] = "images/missing.png"
    write_rows(dataset, rows)
    with pytest.raises(SkingenError, match=r"train.jsonl:3: 'image' file 'images/missing.png' not found"):
        caption.main(["--dataset_dir", str(dataset), "--captioner", "template"])
    rows[2]["image"] = "images/white.png"
    rows[0]["texts"] = "前往"
    write_rows(dataset, rows)
    with pytest.raises(SkingenError, match=r"train.jsonl:1: 'texts' must be a list of strings"):
        caption.main(["--dataset_dir", str(dataset), "--captioner", "template"])


def test_compose_caption_leaves_out_empty_parts():
    assert compose_caption("a cat", "iflyskin", ["前往", " ", "搜索 "]) == 'a cat, iflyskin, writing "前往 搜索"'
    assert compose_caption("a cat,", "", []) == "a cat"


def test_cli_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "caption.py", "--dataset_dir", str(tmp_path), "--captioner", "template"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "train.jsonl: not found" in result.stderr and "Traceback" not in result.stderr


def test_writing_names_the_largest_texts_when_a_skin_has_many(tmp_path):
    dataset = tmp_path / "many"
    (dataset / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), (0, 0, 128)).save(dataset / "images" / "0.png")
    sizes = {"小": 4, "大字": 20, "中": 10, "巨大": 30}
    boxes = [[[0, 0], [side, 0], [side, side], [0, side]] for side in sizes.values()]
    write_rows(dataset, [{"image": "images/0.png", "text": "", "box": boxes, "texts": list(sizes)}])
    caption.main(["--dataset_dir", str(dataset), "--captioner", "template", "--max_writing_texts", "2"])
    (row,) = read_rows(dataset)
    assert row["text"].endswith('writing "大字 巨大"')  # the two largest, in reading order
    assert row["texts"] == list(sizes)  # the row keeps every text for the text loss
    caption.main(["--dataset_dir", str(dataset), "--captioner", "template", "--max_writing_texts", "0", "--overwrite"])
    assert read_rows(dataset)[0]["text"].endswith('writing "小 大字 中 巨大"')
