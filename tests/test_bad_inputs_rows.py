"""Bad dataset rows through every stage that reads rows, as a user runs the scripts (in-process, through run_cli):
each ends with ``error: <file>:<line>: ...`` (or, for ``dataset_tool.py validate``, a report line), the documented
exit status, no traceback, and every input file unchanged.

One table of bad rows; each stage gets the cases for the fields it reads (skingen.data.rows: caption does not need a
conditioning image, inference does not need the target image, ...). The rules are the same in every stage.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from repo_scripts import load_script

from skingen.data.dataset import load_skin_dataset
from skingen.data.rows import CAPTION, EVALUATE, INFERENCE, RENDER, TRAINING, check_row
from skingen.errors import run_cli

SCRIPTS = {
    name: load_script(f"{name}.py") for name in ("caption", "render_glyphs", "dataset_tool", "inference", "evaluate")
}
SIZE = (32, 16)
QUAD = [[2, 2], [20, 2], [20, 8], [2, 8]]
QUAD2 = [[22, 2], [30, 2], [30, 8], [22, 8]]
BAD_LINE = 3  # line 2 is blank: line numbers count it


def good_row(i: int, **changes) -> dict:
    row = {
        "text": f'a skin {i}, iflyskin, writing "前往"',
        "image": f"images/{i}.png",
        "conditioning_image": f"conditioning_images/{i}.png",
        "box": [QUAD],
    }
    row.update(changes)
    return {key: value for key, value in row.items() if value is not DROP}


DROP = object()  # a key to leave out of the row


def make_dataset(root: Path, bad_line: str) -> Path:
    """Rows 0 and 1 are good; the bad line is line 3 (after a blank line 2)."""
    for folder in ("images", "conditioning_images"):
        (root / folder).mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", SIZE, (60 * i, 80, 120)).save(root / "images" / f"{i}.png")
        Image.new("RGB", SIZE, (0, 0, 0)).save(root / "conditioning_images" / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    (root / "images" / "empty.png").write_bytes(b"")
    (root / "images" / "folder.png").mkdir()
    outside = root.parent / "outside.png"
    Image.new("RGB", SIZE).save(outside)
    os.symlink(outside, root / "images" / "link.png")
    os.symlink(root / "images" / "2.png", root / "images" / "inside_link.png")  # stays inside: allowed
    lines = [json.dumps(good_row(0), ensure_ascii=False), "", bad_line, json.dumps(good_row(1), ensure_ascii=False)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def run(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    # "train": the loader the trainers call before any model is loaded (the training scripts are tested elsewhere).
    main = (lambda args: load_skin_dataset(args[0])) if script == "train" else SCRIPTS[script].main
    try:
        run_cli(main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------------------
# The table: name -> (bad line, expected message part, stages that read the field)

READS_IMAGE = {"train", "caption", "render", "validate", "convert", "inference", "evaluate"}
NEEDS_IMAGE = READS_IMAGE - {"inference"}
READS_CONDITIONING = {"train", "validate", "convert", "inference", "evaluate"}
NEEDS_CONDITIONING = {"train", "validate", "convert", "inference"}
READS_TEXT = {"train", "caption", "validate", "convert", "inference", "evaluate"}
NEEDS_TEXT = {"train", "validate", "convert", "inference"}
READS_BOX = {"train", "caption", "validate", "convert", "inference", "evaluate"}
EVERY = READS_IMAGE


def line(**changes) -> str:
    return json.dumps(good_row(2, **changes), ensure_ascii=False)


def raw_box(text: str) -> str:
    """A row whose box is written as raw JSON (NaN and Infinity are what json.dumps writes for those floats)."""
    return line(box=DROP)[:-1] + f', "box": {text}}}'


CASES = {
    # JSON
    "invalid json": ('{"text": "x", "image": ', "invalid JSON", EVERY),
    "not an object": ("[1, 2]", "expected a JSON object, got list", EVERY),
    "a string line": ('"images/2.png"', "expected a JSON object, got str", EVERY),
    # the image
    "image missing": (line(image=DROP), "missing 'image' (keys in this row:", NEEDS_IMAGE),
    "image null": (line(image=None), "missing 'image'", NEEDS_IMAGE),
    "image a number": (
        line(image=5),
        "'image' must be an image path relative to the dataset folder, got a int (5)",
        READS_IMAGE,
    ),
    "image a list": (line(image=["images/2.png"]), "got a list", READS_IMAGE),
    "image empty": (line(image=""), "'image' must be an image path", READS_IMAGE),
    "image absolute": (line(image="/etc/passwd"), "'image' path '/etc/passwd' leaves the dataset folder", READS_IMAGE),
    "image dotdot": (
        line(image="../outside.png"),
        "'image' path '../outside.png' leaves the dataset folder",
        READS_IMAGE,
    ),
    "image dotdot inside": (line(image="images/../../outside.png"), "leaves the dataset folder", READS_IMAGE),
    "image home": (line(image="~/x.png"), "leaves the dataset folder", READS_IMAGE),
    "image windows drive": (line(image="C:\\skins\\x.png"), "leaves the dataset folder", READS_IMAGE),
    "image backslash dotdot": (line(image="..\\outside.png"), "leaves the dataset folder", READS_IMAGE),
    "image symlink outside": (line(image="images/link.png"), "is a symlink to", READS_IMAGE),
    "image not found": (line(image="images/404.png"), "'image' file 'images/404.png' not found", READS_IMAGE),
    "image is a folder": (line(image="images/folder.png"), "'image' file 'images/folder.png' not found", READS_IMAGE),
    "image not an image": (line(image="notes.txt"), "'image' file 'notes.txt' is not a readable image", READS_IMAGE),
    "image zero bytes": (
        line(image="images/empty.png"),
        "'image' file 'images/empty.png' is not a readable image",
        READS_IMAGE,
    ),
    "image used twice": (
        line(image="images/0.png"),
        "image 'images/0.png' is already used by",
        READS_IMAGE,
    ),
    # the conditioning image
    "conditioning missing": (line(conditioning_image=DROP), "missing 'conditioning_image'", NEEDS_CONDITIONING),
    "conditioning a number": (
        line(conditioning_image=3),
        "'conditioning_image' must be an image path",
        READS_CONDITIONING,
    ),
    "conditioning a dict": (line(conditioning_image={"path": "x.png"}), "got a dict", READS_CONDITIONING),
    "conditioning absolute": (
        line(conditioning_image="/tmp/c.png"),
        "'conditioning_image' path '/tmp/c.png' leaves",
        READS_CONDITIONING,
    ),
    "conditioning dotdot": (line(conditioning_image="../outside.png"), "leaves the dataset folder", READS_CONDITIONING),
    "conditioning symlink outside": (line(conditioning_image="images/link.png"), "is a symlink to", READS_CONDITIONING),
    "conditioning not found": (
        line(conditioning_image="conditioning_images/9.png"),
        "'conditioning_image' file 'conditioning_images/9.png' not found",
        READS_CONDITIONING,
    ),
    "conditioning not an image": (line(conditioning_image="notes.txt"), "is not a readable image", READS_CONDITIONING),
    # the caption
    "caption missing": (line(text=DROP), "missing 'text'", NEEDS_TEXT),
    "caption empty": (line(text="   "), "empty caption in 'text'", NEEDS_TEXT),
    "caption a number": (line(text=5, box=DROP), "caption 'text' must be a string, got int", READS_TEXT),
    "caption a list": (line(text=["a", "b"], box=DROP), "caption 'text' must be a string, got list", READS_TEXT),
    # boxes
    "box a string": (line(box="[[2,2],[20,2],[20,8],[2,8]]"), "'box' must be a list of 4-point quads", READS_BOX),
    "box a dict": (line(box={"x": 1}), "'box' must be a list of 4-point quads", READS_BOX),
    "box a number": (line(box=7), "'box' must be a list of 4-point quads", READS_BOX),
    "box flat rectangle": (line(box=[[2, 2, 20, 8]]), "box 1 is [2, 2, 20, 8]: expected 4 [x, y] points", READS_BOX),
    "box three points": (
        line(box=[[[2, 2], [20, 2], [20, 8]]]),
        "box 1 is [[2, 2], [20, 2], [20, 8]]: expected 4",
        READS_BOX,
    ),
    "box five points": (line(box=[QUAD + [[1, 1]]]), "box 1 is", READS_BOX),
    "box point of three": (line(box=[[[2, 2, 0], [20, 2], [20, 8], [2, 8]]]), "box 1 is", READS_BOX),
    "box string coordinate": (line(box=[[[2, 2], [20, "2"], [20, 8], [2, 8]]]), "box 1 is", READS_BOX),
    "box bool coordinate": (line(box=[[[2, 2], [20, True], [20, 8], [2, 8]]]), "box 1 is", READS_BOX),
    "box null coordinate": (line(box=[[[2, 2], [20, None], [20, 8], [2, 8]]]), "box 1 is", READS_BOX),
    "box nested too deep": (line(box=[[[[2, 2]], [20, 2], [20, 8], [2, 8]]]), "box 1 is", READS_BOX),
    "box NaN": (
        raw_box("[[[2, 2], [NaN, 2], [20, 8], [2, 8]]]"),
        "box 1 has a coordinate that is not a finite number",
        READS_BOX,
    ),
    "box Infinity": (raw_box("[[[2, 2], [Infinity, 2], [20, 8], [2, 8]]]"), "not a finite number", READS_BOX),
    "box -Infinity": (raw_box("[[[2, 2], [20, -Infinity], [20, 8], [2, 8]]]"), "not a finite number", READS_BOX),
    "box one point": (
        line(box=[[[5, 5]] * 4]),
        "box 1 [[5, 5], [5, 5], [5, 5], [5, 5]] has an area of 0 px²",
        READS_BOX,
    ),
    "box on a line": (line(box=[[[2, 2], [10, 2], [20, 2], [30, 2]]]), "has an area of 0 px²", READS_BOX),
    "box thinner than a pixel": (
        line(box=[[[2, 2], [20, 2], [20, 2.02], [2, 2.02]]]),
        "has an area of 0.36 px²",
        READS_BOX,
    ),
    "box second zero": (line(box=[QUAD, [[3, 3]] * 4], texts=["a", "b"]), "box 2", READS_BOX),
    "box right of image": (
        line(box=[[[2, 2], [40, 2], [40, 8], [2, 8]]]),
        "box 1 point (40, 2) lies outside the 32x16 image",
        READS_BOX,
    ),
    "box below image": (line(box=[[[2, 2], [20, 2], [20, 30], [2, 30]]]), "lies outside the 32x16 image", READS_BOX),
    "box negative": (line(box=[[[-9, 2], [20, 2], [20, 8], [-9, 8]]]), "point (-9, 2) lies outside", READS_BOX),
    "box huge": (line(box=[[[0, 0], [1e9, 0], [1e9, 8], [0, 8]]]), "lies outside the 32x16 image", READS_BOX),
    # texts
    "texts too many": (line(texts=["a", "b"]), "'texts' has 2 entries but 'box' has 1", READS_BOX),
    "texts too few": (line(box=[QUAD, QUAD2], texts=["a"]), "'texts' has 1 entries but 'box' has 2", READS_BOX),
    "texts without box": (line(box=DROP, texts=["a"]), "'texts' has 1 entries but 'box' has 0", READS_BOX),
    "texts a string": (line(texts="前往"), "'texts' must be a list of strings, got \"前往\"", READS_BOX),
    "texts numbers": (line(texts=[1]), "'texts' must be a list of strings, got [1]", READS_BOX),
    "texts null entry": (line(texts=[None]), "'texts' must be a list of strings", READS_BOX),
    "caption names too few": (line(box=[QUAD, QUAD2]), "2 box(es) but the caption names 1 text(s)", READS_BOX),
    "caption names too many": (
        line(text='writing "a b c"', box=[QUAD, QUAD2]),
        "2 box(es) but the caption names 1 text(s)",
        READS_BOX,
    ),
    "caption names none": (
        line(text="a plain skin", box=[QUAD]),
        "1 box(es) but the caption names 0 text(s)",
        READS_BOX,
    ),
    # inference's own field
    "seed negative": (line(seed=-1), "'seed' must be a non-negative integer, got -1", {"inference"}),
    "seed a string": (line(seed="7"), "'seed' must be a non-negative integer, got \"7\"", {"inference"}),
    "seed a float": (line(seed=1.5), "'seed' must be a non-negative integer, got 1.5", {"inference"}),
    "seed a bool": (line(seed=True), "'seed' must be a non-negative integer, got true", {"inference"}),
}


def stage_argv(stage: str, root: Path, tmp_path: Path) -> tuple[str, list[str]]:
    if stage == "train":
        return "train", [str(root)]
    if stage == "caption":
        return "caption", ["--dataset_dir", str(root), "--captioner", "template"]
    if stage == "render":
        return "render_glyphs", ["--dataset_dir", str(root), "--mode", "canny"]
    if stage == "validate":
        return "dataset_tool", ["validate", str(root)]
    if stage == "convert":
        return "dataset_tool", ["convert", str(root), str(tmp_path / "converted"), "--to", "imagefolder"]
    if stage == "inference":
        # The rows are read before any model: a folder that is not a pipeline is never reached.
        return "inference", [
            "--pretrained_model_name_or_path", str(tmp_path / "no_model"), "--controlnet", str(tmp_path / "no_cn"),
            "--dataset_dir", str(root), "--output_dir", str(tmp_path / "generated"),
        ]  # fmt: skip
    if stage == "evaluate":
        generated = tmp_path / "generated"
        generated.mkdir(exist_ok=True)
        for i in range(3):
            Image.new("RGB", SIZE, (9, 9, 9)).save(generated / f"{i}.png")
        return "evaluate", ["--dataset_dir", str(root), "--images_dir", str(generated), "--ocr_backend", "none"]
    raise AssertionError(stage)


STAGES = ("train", "caption", "render", "validate", "convert", "inference", "evaluate")
PARAMS = [
    pytest.param(stage, name, id=f"{stage}-{name}")
    for stage in STAGES
    for name, case in CASES.items()
    if stage in case[2]
]


@pytest.mark.parametrize("stage, name", PARAMS)
def test_bad_row_is_reported_by_file_and_line(stage, name, tmp_path, capsys):
    bad, expected, _ = CASES[name]
    root = make_dataset(tmp_path / "ds", bad)
    script, argv = stage_argv(stage, root, tmp_path)
    before = digest(tmp_path)
    code, out, err = run(script, argv, capsys)
    where = f"{root / 'train.jsonl'}:{BAD_LINE}: "
    assert "Traceback" not in err
    if stage == "validate":  # a report on stdout, every problem listed; status 1 = "the dataset has bad rows"
        assert code == 1, err
        assert f"{where}" in out and expected in out, out
        assert "bad: 1" in out
    else:
        assert code == 2, (out, err)
        assert err.startswith("error: "), err
        assert where in err and expected in err, err
        assert f"{root / 'train.jsonl'}:1: " not in err and f"{root / 'train.jsonl'}:4: " not in err  # good rows pass
    assert digest(tmp_path) == before  # no input changed, nothing written
    assert not (tmp_path / "converted").exists()


def test_the_table_covers_every_stage():
    counts = {stage: sum(1 for case in CASES.values() if stage in case[2]) for stage in STAGES}
    assert min(counts.values()) >= 15, counts
    assert len(PARAMS) >= 100


def test_several_problems_of_one_row_are_each_named(tmp_path, capsys):
    bad = line(image="/abs.png", conditioning_image=4, text="", box="nope")
    root = make_dataset(tmp_path / "ds", bad)
    parts = (
        "empty caption",
        "'image' path '/abs.png' leaves",
        "'conditioning_image' must be an image path",
        "'box' must be",
    )
    code, out, _ = run("dataset_tool", ["validate", str(root)], capsys)
    assert code == 1
    listed = [text.strip() for text in out.splitlines() if f"train.jsonl:{BAD_LINE}:" in text]
    assert len(listed) == len(parts)  # one line per problem, each naming the file and line
    for part in parts:
        assert any(text.startswith(f"{root / 'train.jsonl'}:{BAD_LINE}: ") and part in text for text in listed), part
    code, _, err = run("train", [str(root)], capsys)
    assert code == 2 and sum(f"train.jsonl:{BAD_LINE}: " in text for text in err.splitlines()) == len(parts)


def test_many_bad_rows_are_listed_at_once(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", line(image="images/404.png"))
    with open(root / "train.jsonl", "a", encoding="utf-8") as f:
        f.write(line(box=[[[1, 1]] * 4]) + "\n" + "{oops\n")
    code, _, err = run("caption", ["--dataset_dir", str(root), "--captioner", "template"], capsys)
    assert code == 2
    assert "3 bad row(s) of 5" in err
    for lineno in (3, 5, 6):
        assert f"train.jsonl:{lineno}: " in err


# ---------------------------------------------------------------------------------------------------------------
# One set of rules: what trains also passes every other stage's check


ACCEPTED = {
    "plain": good_row(0, box=DROP),
    "boxes with texts": good_row(0, box=[QUAD, QUAD2], texts=["前往", "搜索"]),
    "texts from caption.py's caption": good_row(0, text='a skin, iflyskin, writing "前往 搜索"', box=[QUAD, QUAD2]),
    "texts from two quoted strings": good_row(0, text='writing "前往" and "搜索"', box=[QUAD, QUAD2]),
    "box touching the border": good_row(0, box=[[[-1, 0], [33, 0], [33, 17], [-1, 17]]]),
    "symlink inside the folder": good_row(0, image="images/inside_link.png"),
    "backslash path": good_row(0, image="images\\0.png"),
    "extra fields kept": good_row(0, package="p0", custom={"a": 1}),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_a_row_that_trains_passes_every_stage(name, tmp_path):
    root = make_dataset(tmp_path / "ds", "")
    row = ACCEPTED[name]
    trained = check_row(row, root, "train.jsonl:1", spec=TRAINING)
    for spec in (CAPTION, RENDER, INFERENCE, EVALUATE):
        checked = check_row(row, root, "train.jsonl:1", spec=spec)
        if spec.reads("box"):
            assert checked.box == trained.box and checked.texts == trained.texts


def test_issue_row_with_two_boxes_and_a_caption_evaluates(tmp_path, capsys):
    """Two boxes, writing "前往 搜索" and no texts: it trains, so evaluate.py must read it too."""
    row = good_row(0, text='a skin, iflyskin, writing "前往 搜索"', box=[QUAD, QUAD2])
    root = make_dataset(tmp_path / "ds", json.dumps(good_row(2), ensure_ascii=False))
    lines = (root / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (root / "train.jsonl").write_text(
        "\n".join([json.dumps(row, ensure_ascii=False)] + lines[1:]) + "\n", encoding="utf-8"
    )
    _, argv = stage_argv("evaluate", root, tmp_path)
    code, out, err = run("evaluate", argv + ["--output_dir", str(tmp_path / "metrics")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "metrics" / "metrics.json").read_text(encoding="utf-8"))
    assert report["summary"]["images"] == 3
