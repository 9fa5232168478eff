"""The dataset loader: every form, every bad input with its file:line message, RGB decoding, convert and split."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets
from skingen.data.dataset import RGBImage, load_skin_dataset, normalize_dataset, read_rows, write_rows
from skingen.data.images import open_rgb, to_rgb
from skingen.data.ops import convert_dataset, split_dataset, validate_dataset, validation_fraction_of
from skingen.data.writing import texts_from_caption
from skingen.errors import SkingenError

REPO = Path(__file__).resolve().parent.parent
QUAD = [[2, 2], [20, 2], [20, 8], [2, 8]]


def _save(path: Path, image: Image.Image) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path.name


def make_jsonl_dataset(root: Path, rows: list[dict] | None = None, n: int = 3, size=(32, 16)) -> Path:
    """A train.jsonl dataset with ``n`` distinct images (row i is red-ish i) and one shared template."""
    root.mkdir(parents=True, exist_ok=True)
    _save(root / "conditioning_images" / "template.png", Image.new("RGB", size, "black"))
    for i in range(n):
        _save(root / "images" / f"{i}.png", Image.new("RGB", size, (40 * i, 0, 0)))
    if rows is None:
        rows = [
            {"text": f"skin {i}", "image": f"images/{i}.png", "conditioning_image": "conditioning_images/template.png"}
            for i in range(n)
        ]
    (root / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return root


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------------------------
# Loading each form


def test_jsonl_form_loads_with_normalised_columns(tmp_path):
    rows = [
        {
            "text": 'iflyskin, a blue skin, writing "前往"',
            "image": "images/0.png",
            "conditioning_image": "conditioning_images/template.png",
            "box": [QUAD],
            "texts": ["前往"],
            "package": "p0",
        },
        {"text": "plain skin", "image": "images/1.png", "conditioning_image": "conditioning_images/template.png"},
    ]
    root = make_jsonl_dataset(tmp_path / "ds", rows, n=2)
    ds = load_skin_dataset(root)
    assert ds.column_names == ["image", "conditioning_image", "text", "box", "texts", "row_id", "where"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["conditioning_image"], datasets.Image)
    assert len(ds) == 2
    first = ds[0]
    assert first["image"].mode == "RGB" and first["image"].size == (32, 16)
    assert first["conditioning_image"].getpixel((0, 0)) == (0, 0, 0)
    assert first["text"] == 'iflyskin, a blue skin, writing "前往"'
    assert first["box"] == [[[2.0, 2.0], [20.0, 2.0], [20.0, 8.0], [2.0, 8.0]]]
    assert first["texts"] == ["前往"]
    assert first["row_id"] == "images/0.png"
    assert ds[1]["box"] == [] and ds[1]["texts"] == []
    assert ds[1]["image"].getpixel((0, 0)) == (40, 0, 0)


def test_images_stay_lazy_file_references(tmp_path):
    ds = load_skin_dataset(make_jsonl_dataset(tmp_path / "ds"))
    stored = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert stored["bytes"] is None
    assert stored["path"] == str(tmp_path / "ds" / "images" / "0.png")
    # The RGB decoding survives ordinary dataset operations.
    shuffled = ds.shuffle(seed=0).filter(lambda text: text != "skin 1", input_columns=["text"])
    assert isinstance(shuffled.features["image"], RGBImage)
    assert len(shuffled) == 2 and shuffled[0]["image"].mode == "RGB"


def test_texts_come_from_caption_when_row_has_boxes_only(tmp_path):
    rows = [
        {
            "text": 'iflyskin, writing "前往" and "返回"',
            "image": "images/0.png",
            "conditioning_image": "conditioning_images/template.png",
            "box": [QUAD, [[22, 2], [30, 2], [30, 8], [22, 8]]],
        }
    ]
    ds = load_skin_dataset(make_jsonl_dataset(tmp_path / "ds", rows, n=1))
    assert ds[0]["texts"] == ["前往", "返回"]


def test_texts_come_from_a_caption_py_caption_one_word_per_box(tmp_path):
    """caption.py writes every text of a row in one quoted string (texts joined by a space)."""
    second = [[22, 2], [30, 2], [30, 8], [22, 8]]
    rows = [
        _row(0, text='a keyboard skin of a navy design, iflyskin, writing "前往 搜索"', box=[QUAD, second]),
        _row(1, text='a skin, iflyskin, writing "前往 "', box=[QUAD]),  # the seed's own rows end in a space
        _row(2, text='iflyskin, writing "Hello World"', box=[QUAD]),  # one box: the whole string is its text
    ]
    ds = load_skin_dataset(make_jsonl_dataset(tmp_path / "ds", rows, n=3))
    assert ds["texts"] == [["前往", "搜索"], ["前往"], ["Hello World"]]

    # Neither one string per box nor one word per box: a bad row that says what to do.
    bad_row = _row(0, text='writing "前往 搜索 设置"', box=[QUAD, second])
    root = make_jsonl_dataset(tmp_path / "bad", [bad_row], n=1)
    with pytest.raises(SkingenError) as info:
        load_skin_dataset(root)
    message = str(info.value)
    assert f"{root / 'train.jsonl'}:1: 2 box(es) but the caption names 1 text(s)" in message
    assert "one space-separated word per box" in message and "add 'texts' aligned with 'box'" in message


@pytest.mark.parametrize(
    "caption, expected",
    [
        ('a skin, writing "前往"', ["前往"]),
        ('writing "Go", writing "返回"', ["Go", "返回"]),
        ('writing "A" and "B", "C"', ["A", "B", "C"]),
        ("writing “你好” here", ["你好"]),
        ('a "quoted" word but no writing', []),
        ('writing ""', []),
        ("", []),
    ],
)
def test_texts_from_caption(caption, expected):
    assert texts_from_caption(caption) == expected


@pytest.mark.parametrize(
    "caption, box_count, expected",
    [
        ('iflyskin, writing "前往 搜索"', 2, ["前往", "搜索"]),
        ('iflyskin, writing "前往 搜索"', 1, ["前往 搜索"]),
        ('writing "Go", writing "返回"', 2, ["Go", "返回"]),
        ('writing "Go back", writing "返回"', 3, ["Go", "back", "返回"]),
        ('writing "前往 搜索 设置"', 2, ["前往 搜索 设置"]),  # no way to get 2: the caller rejects the row
    ],
)
def test_texts_from_caption_for_a_number_of_boxes(caption, box_count, expected):
    assert texts_from_caption(caption, box_count=box_count) == expected


def _write_imagefolder(folder: Path, n: int = 2, extra: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        _save(folder / "images" / f"{i}.png", Image.new("RGB", (16, 16), (0, 50 * i, 0)))
        _save(folder / "conds" / f"{i}.png", Image.new("RGB", (16, 16), "white"))
        row = {"file_name": f"images/{i}.png", "conditioning_image_file_name": f"conds/{i}.png", "text": f"green {i}"}
        lines.append(json.dumps({**row, **(extra or {})}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_imagefolder_form_and_its_splits(tmp_path):
    flat = tmp_path / "flat"
    _write_imagefolder(flat)
    ds = load_skin_dataset(flat)
    assert ds["text"] == ["green 0", "green 1"]
    assert ds["row_id"] == ["images/0.png", "images/1.png"]
    assert ds[1]["image"].getpixel((0, 0)) == (0, 50, 0)

    nested = tmp_path / "nested"
    _write_imagefolder(nested / "train", n=3)
    _write_imagefolder(nested / "validation", n=1)
    assert len(load_skin_dataset(nested)) == 3
    val = load_skin_dataset(nested, split="validation")
    assert val["row_id"] == ["validation/images/0.png"]


def test_imagefolder_accepts_diffusers_style_column_names(tmp_path):
    folder = tmp_path / "if"
    _write_imagefolder(folder)
    # After datasets' ImageFolder loading these columns are called "image"/"conditioning_image"; users pass those.
    ds = load_skin_dataset(folder, image_column="image", conditioning_image_column="conditioning_image")
    assert len(ds) == 2


def test_folder_with_both_forms_reads_train_jsonl(tmp_path, capsys):
    root = make_jsonl_dataset(tmp_path / "ds", n=2)
    _write_imagefolder(root, n=1)  # adds a metadata.jsonl that must not be used
    ds = load_skin_dataset(root)
    assert ds["text"] == ["skin 0", "skin 1"]
    assert "reading train.jsonl" in capsys.readouterr().err


def test_column_flags_override_jsonl_keys(tmp_path):
    rows = [{"prompt": "custom keys", "target": "images/0.png", "source": "conditioning_images/template.png"}]
    root = make_jsonl_dataset(tmp_path / "ds", rows, n=1)
    ds = load_skin_dataset(root, image_column="target", conditioning_image_column="source", caption_column="prompt")
    assert ds[0]["text"] == "custom keys"
    with pytest.raises(SkingenError, match=r"train.jsonl:1: missing 'image', 'conditioning_image', 'text'"):
        load_skin_dataset(root)


def _hub_style_dataset() -> datasets.Dataset:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent: must decode as white
    return datasets.Dataset.from_dict(
        {
            "target": [Image.new("RGB", (8, 8), "blue"), rgba],
            "control": [Image.new("L", (8, 8), 255), Image.new("L", (8, 8), 0)],
            "caption": ["blue", 'writing "OK"'],
            "box": [[], [[[0, 0], [7, 0], [7, 7], [0, 7]]]],
        }
    )


def test_in_memory_hub_dataset_is_normalised():
    ds = normalize_dataset(
        _hub_style_dataset(), image_column="target", conditioning_image_column="control", caption_column="caption"
    )
    assert ds.column_names == ["image", "conditioning_image", "text", "box", "texts", "row_id", "where"]
    assert isinstance(ds.features["image"], RGBImage)
    assert ds[0]["image"].getpixel((0, 0)) == (0, 0, 255)
    assert ds[1]["image"].getpixel((0, 0)) == (255, 255, 255)
    assert ds[0]["conditioning_image"].mode == "RGB"
    assert ds[1]["texts"] == ["OK"]
    assert len(set(ds["row_id"])) == 2


def test_hub_dataset_missing_column_names_the_flags():
    with pytest.raises(SkingenError) as info:
        normalize_dataset(_hub_style_dataset(), source="user/skins")
    message = str(info.value)
    assert "user/skins: no column 'image' (--image_column)" in message
    assert "'target'" in message and "--caption_column" in message


def test_dataset_name_goes_through_load_dataset(tmp_path):
    # A hub dataset's on-disk shape (parquet shards), loaded offline through datasets.load_dataset.
    repo = tmp_path / "hub_repo"
    (repo / "data").mkdir(parents=True)
    _hub_style_dataset().to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    ds = load_skin_dataset(
        dataset_name=str(repo),
        image_column="target",
        conditioning_image_column="control",
        caption_column="caption",
        cache_dir=tmp_path / "cache",
    )
    assert len(ds) == 2 and ds[1]["image"].getpixel((3, 3)) == (255, 255, 255)


def test_hub_bad_row_is_named_by_row_number():
    bad = _hub_style_dataset().map(lambda row, i: {"caption": "" if i == 1 else row["caption"]}, with_indices=True)
    with pytest.raises(SkingenError, match=r"skins \(train\) row 1: empty caption in 'caption'"):
        normalize_dataset(
            bad,
            image_column="target",
            conditioning_image_column="control",
            caption_column="caption",
            source="skins (train)",
        )


def test_exactly_one_source_is_required(tmp_path):
    with pytest.raises(SkingenError, match="exactly one of --train_data_dir"):
        load_skin_dataset()
    with pytest.raises(SkingenError, match="exactly one of --train_data_dir"):
        load_skin_dataset(tmp_path, dataset_name="x/y")


def test_missing_folder_and_unknown_layout(tmp_path):
    with pytest.raises(SkingenError, match="dataset folder not found"):
        load_skin_dataset(tmp_path / "nope")
    (tmp_path / "fill50k.py").write_text("# an old loading script\n")
    with pytest.raises(SkingenError) as info:
        load_skin_dataset(tmp_path)
    assert "no train.jsonl or train metadata.jsonl here (found: fill50k.py)" in str(info.value)
    assert "loading scripts (*.py) are no longer supported" in str(info.value)


def test_max_samples_keeps_first_good_rows(tmp_path):
    ds = load_skin_dataset(make_jsonl_dataset(tmp_path / "ds", n=3), max_samples=2)
    assert ds["row_id"] == ["images/0.png", "images/1.png"]


# ---------------------------------------------------------------------------------------------------------------
# Bad rows


def _row(i: int = 0, **changes) -> dict:
    row = {"text": f"skin {i}", "image": f"images/{i}.png", "conditioning_image": "conditioning_images/template.png"}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


BAD_ROWS = {
    "bad json": ('{"text": "x", "image": ', "invalid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object, got list"),
    "missing key": (_row(conditioning_image=None), "missing 'conditioning_image' (keys in this row: image, text)"),
    "missing image": (_row(image="images/99.png"), "'image' file 'images/99.png' not found"),
    "unreadable image": (_row(image="notes.txt"), "'image' file 'notes.txt' is not a readable image"),
    "absolute path": (_row(image="/etc/passwd"), "'image' path '/etc/passwd' leaves the dataset folder"),
    "dotdot path": (
        _row(conditioning_image="../outside.png"),
        "'conditioning_image' path '../outside.png' leaves the dataset folder",
    ),
    "box not quads": (_row(box=[[0, 0, 10, 10]], texts=["a"]), "box 1 is [0, 0, 10, 10]: expected 4 [x, y] points"),
    "box three points": (
        _row(box=[[[0, 0], [1, 0], [1, 1]]], texts=["a"]),
        "box 1 is [[0, 0], [1, 0], [1, 1]]: expected 4",
    ),
    "box not numbers": (_row(box=[[[0, 0], [1, "a"], [1, 1], [0, 1]]], texts=["a"]), "box 1 is"),
    "box outside": (
        _row(box=[[[0, 0], [40, 0], [40, 8], [0, 8]]], texts=["a"]),
        "box 1 point (40, 0) lies outside the 32x16 image",
    ),
    "texts count": (_row(box=[QUAD], texts=["a", "b"]), "'texts' has 2 entries but 'box' has 1"),
    "texts not strings": (_row(box=[QUAD], texts=[1]), "'texts' must be a list of strings"),
    "caption texts count": (_row(box=[QUAD, QUAD], text='writing "one"'), "2 box(es) but the caption names 1 text(s)"),
    "empty caption": (_row(text="  "), "empty caption in 'text'"),
    "caption not string": (_row(text=5), "caption 'text' must be a string, got int"),
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_each_bad_row_has_its_own_message_with_file_and_line(tmp_path, name):
    bad, expected = BAD_ROWS[name]
    root = make_jsonl_dataset(tmp_path / "ds", n=2)
    (root / "notes.txt").write_text("not an image")
    _save(tmp_path / "outside.png", Image.new("RGB", (4, 4)))  # exists, but outside the folder
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    (root / "train.jsonl").write_text(json.dumps(_row(0)) + "\n\n" + bad_line + "\n" + json.dumps(_row(1)) + "\n")
    with pytest.raises(SkingenError) as info:
        load_skin_dataset(root)
    message = str(info.value)
    assert f"{root / 'train.jsonl'}:3: " in message  # blank line 2 still counts
    assert expected in message
    assert "1 bad row(s) of 3" in message and "--on_bad_sample skip" in message


def test_box_within_tolerance_is_accepted(tmp_path):
    rows = [_row(0, box=[[[-1, 0], [33, 0], [33, 17], [-1, 17]]], texts=["edge"])]
    assert len(load_skin_dataset(make_jsonl_dataset(tmp_path / "ds", rows, n=1))) == 1


def test_duplicate_image_is_a_bad_row(tmp_path):
    root = make_jsonl_dataset(tmp_path / "ds", [_row(0), _row(0, text="again")], n=1)
    with pytest.raises(SkingenError, match=r"train.jsonl:2: image 'images/0.png' is already used by .*train.jsonl:1"):
        load_skin_dataset(root)


def test_error_lists_first_problems_and_count(tmp_path):
    rows = [_row(i) for i in range(3)] + [_row(0, image=f"images/missing{i}.png") for i in range(14)]
    root = make_jsonl_dataset(tmp_path / "ds", rows, n=3)
    with pytest.raises(SkingenError) as info:
        load_skin_dataset(root)
    message = str(info.value)
    assert "14 bad row(s) of 17 (14 image not found)" in message
    assert "train.jsonl:4:" in message and "train.jsonl:13:" in message
    assert "train.jsonl:14:" not in message
    assert "... and 4 more" in message


def test_skip_drops_exactly_the_bad_rows_and_reports(tmp_path, capsys):
    rows = [_row(0), _row(1, text=""), "{broken", _row(2), _row(1, image="images/404.png")]
    root = make_jsonl_dataset(tmp_path / "ds", n=3)
    (root / "train.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    ds = load_skin_dataset(root, on_bad_sample="skip")
    assert ds["row_id"] == ["images/0.png", "images/2.png"]
    err = capsys.readouterr().err
    assert "skipped 3 bad row(s) of 5" in err and "kept 2" in err
    assert "train.jsonl:2: empty caption" in err and "train.jsonl:3: invalid JSON" in err and "train.jsonl:5:" in err


def test_skip_with_no_good_rows_is_an_error(tmp_path):
    root = make_jsonl_dataset(tmp_path / "ds", [_row(0, text="")], n=1)
    with pytest.raises(SkingenError, match="no usable rows"):
        load_skin_dataset(root, on_bad_sample="skip")


def test_unknown_on_bad_sample(tmp_path):
    with pytest.raises(SkingenError, match="--on_bad_sample must be one of"):
        load_skin_dataset(make_jsonl_dataset(tmp_path / "ds"), on_bad_sample="ignore")


# ---------------------------------------------------------------------------------------------------------------
# RGB conversion


def test_to_rgb_palette():
    image = Image.new("P", (2, 2))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((0, 0), 1)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (10, 200, 30) and out.getpixel((1, 1)) == (0, 0, 0)


def test_to_rgb_palette_with_transparent_index_is_white():
    image = Image.new("P", (2, 2))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0
    out = to_rgb(image)
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (10, 200, 30)


def test_to_rgb_alpha_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    out = to_rgb(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((1, 0))
    assert b == 255 and 120 <= r <= 135 and r == g  # half blue over white
    la = Image.new("LA", (1, 1), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_16_bit_is_scaled_not_clipped():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = to_rgb(image)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_to_rgb_cmyk_and_grey_and_bilevel():
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)


def _exif_rotated_jpeg(path: Path) -> None:
    """A 40x20 JPEG, left half black, with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    image = Image.new("RGB", (40, 20), "white")
    image.paste((0, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)


def test_to_rgb_applies_exif_orientation(tmp_path):
    _exif_rotated_jpeg(tmp_path / "r.jpg")
    out = to_rgb(Image.open(tmp_path / "r.jpg"))
    assert out.size == (20, 40)
    assert sum(out.getpixel((10, 5))) < 60 and sum(out.getpixel((10, 35))) > 700  # black half is now on top


def test_open_rgb_converts_like_the_loader_and_names_file_and_row(tmp_path):
    _save(tmp_path / "clear.png", Image.new("RGBA", (2, 2), (255, 0, 0, 0)))
    opened = open_rgb(tmp_path / "clear.png")
    assert opened.mode == "RGB" and opened.getpixel((0, 0)) == (255, 255, 255)  # transparency on white
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SkingenError, match=r"^list.jsonl row 3: image .*gone.png not found; fix the path"):
        open_rgb(tmp_path / "gone.png", "list.jsonl row 3")
    with pytest.raises(SkingenError, match=r"^image .*notes.txt is not a readable image .*replace it or drop the row"):
        open_rgb(tmp_path / "notes.txt")


def test_loader_decodes_every_mode_to_rgb_and_checks_boxes_in_displayed_pixels(tmp_path):
    root = tmp_path / "ds"
    _save(root / "images" / "rgba.png", Image.new("RGBA", (20, 40), (0, 0, 0, 0)))
    Image.fromarray(np.full((40, 20), 65535, dtype=np.uint16)).save(root / "images" / "grey16.png")
    _exif_rotated_jpeg(root / "images" / "rotated.jpg")
    _save(root / "cond.png", Image.new("L", (20, 40)))
    tall_box = [[[0, 30], [20, 30], [20, 40], [0, 40]]]  # fits the displayed 20x40, not the stored 40x20
    rows = [
        {"text": 'writing "A"', "image": f"images/{name}", "conditioning_image": "cond.png", "box": tall_box}
        for name in ("rgba.png", "grey16.png", "rotated.jpg")
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_skin_dataset(root)
    decoded = [row["image"] for row in ds]
    assert all(im.mode == "RGB" and im.size == (20, 40) for im in decoded)
    assert decoded[0].getpixel((5, 5)) == (255, 255, 255)
    assert decoded[1].getpixel((5, 5)) == (255, 255, 255)
    assert ds[0]["conditioning_image"].mode == "RGB"
    report = validate_dataset(root)
    assert report["image_sizes"] == {"20x40": 3}


# ---------------------------------------------------------------------------------------------------------------
# Rows between stages


def test_read_and_write_rows_keep_every_field(tmp_path):
    root = tmp_path / "new" / "ds"  # write_rows creates the folder
    rows = [{"image": "images/a.png", "package": "pkg", "elements": {"enter": [1, 2, 3, 4]}, "text": ""}]
    write_rows(root, rows)
    loaded = read_rows(root)
    assert loaded == rows
    loaded[0]["conditioning_image"] = "conditioning_images/a.png"
    write_rows(root, loaded)
    assert read_rows(root)[0] == {**rows[0], "conditioning_image": "conditioning_images/a.png"}
    assert sorted(p.name for p in root.iterdir()) == ["train.jsonl"]  # no temp files left


def test_read_rows_errors_name_file_and_line(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    with pytest.raises(SkingenError, match="train.jsonl: not found; .*merge_elements.py"):
        read_rows(root)
    (root / "train.jsonl").write_text('{"image": "a.png"}\n{oops\n')
    with pytest.raises(SkingenError, match=r"train.jsonl:2: invalid JSON"):
        read_rows(root)


# ---------------------------------------------------------------------------------------------------------------
# validate, convert, split


def test_validate_report(tmp_path):
    rows = [_row(0, box=[QUAD], texts=["a"]), _row(1), _row(2, text="")]
    root = make_jsonl_dataset(tmp_path / "ds", rows, n=3)
    _save(root / "images" / "1.png", Image.new("RGB", (64, 64)))
    report = validate_dataset(root)
    assert report["form"] == "jsonl" and report["rows"] == 3 and report["ok"] == 2
    assert report["bad"] == [
        {
            "where": f"{root / 'train.jsonl'}:3",
            "problems": ["empty caption in 'text'; fill it (caption.py) or drop the row"],
        }
    ]
    assert report["problem_counts"] == {"empty caption": 1}
    assert report["image_sizes"] == {"32x16": 1, "64x64": 1}
    assert report["rows_with_boxes"] == 1 and report["boxes"] == 1
    assert report["size_mismatches"] == 1


def test_convert_round_trip_keeps_rows_and_never_touches_source(tmp_path):
    rows = [
        _row(0, box=[QUAD], texts=["前往"], package="p0"),
        _row(1, package="p1"),
    ]
    src = make_jsonl_dataset(tmp_path / "src", rows, n=2)
    before = tree_digest(src)

    image_folder = tmp_path / "as_imagefolder"
    summary = convert_dataset(src, image_folder, to="imagefolder")
    assert summary["splits"] == {"train": {"rows": 2, "skipped": 0}}
    meta = [json.loads(line) for line in (image_folder / "metadata.jsonl").read_text().splitlines()]
    assert (
        meta[0]["file_name"] == "images/0.png"
        and meta[0]["conditioning_image_file_name"] == "conditioning_images/template.png"
    )
    assert meta[0]["package"] == "p0" and meta[0]["texts"] == ["前往"]

    # datasets' own ImageFolder builder reads what we wrote.
    hf = datasets.load_dataset(str(image_folder), split="train", cache_dir=str(tmp_path / "cache"))
    assert set(hf.column_names) >= {"image", "conditioning_image", "text"}

    back = tmp_path / "back"
    convert_dataset(image_folder, back, to="jsonl", link="hardlink")
    assert read_rows(back) == read_rows(src)
    assert tree_digest(back) == tree_digest(src)
    assert tree_digest(src) == before
    ours, theirs = load_skin_dataset(src), load_skin_dataset(back)
    assert ours["text"] == theirs["text"] and ours["box"] == theirs["box"] and ours["row_id"] == theirs["row_id"]


def test_convert_with_validation_split_to_imagefolder_subfolders(tmp_path):
    src = make_jsonl_dataset(tmp_path / "src", n=3)
    (src / "validation.jsonl").write_text(json.dumps(_row(2)) + "\n")
    (src / "train.jsonl").write_text("".join(json.dumps(_row(i)) + "\n" for i in range(2)))
    out = tmp_path / "out"
    convert_dataset(src, out, to="imagefolder", link="hardlink")
    assert (out / "train" / "metadata.jsonl").is_file() and (out / "validation" / "metadata.jsonl").is_file()
    assert (out / "validation" / "images" / "2.png").stat().st_ino == (src / "images" / "2.png").stat().st_ino
    assert load_skin_dataset(out, split="validation")["row_id"] == ["validation/images/2.png"]


def test_convert_refuses_non_empty_destination_and_bad_rows(tmp_path):
    src = make_jsonl_dataset(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("x")
    with pytest.raises(SkingenError, match="already exists and is not empty"):
        convert_dataset(src, tmp_path / "dst", to="jsonl")
    (src / "train.jsonl").write_text(json.dumps(_row(0)) + "\n" + json.dumps(_row(1, text="")) + "\n")
    with pytest.raises(SkingenError, match="train.jsonl:2: empty caption"):
        convert_dataset(src, tmp_path / "new", to="jsonl")
    assert not (tmp_path / "new").exists()
    convert_dataset(src, tmp_path / "new", to="jsonl", on_bad_sample="skip")
    assert len(read_rows(tmp_path / "new")) == 1


def test_split_is_deterministic_hash_based_and_stable_when_rows_are_added(tmp_path):
    n = 40
    src = make_jsonl_dataset(tmp_path / "src", n=n)
    one = split_dataset(src, val_fraction=0.25, seed=3, dst=tmp_path / "one")
    split_dataset(src, val_fraction=0.25, seed=3, dst=tmp_path / "two")
    assert (tmp_path / "one" / "validation.jsonl").read_bytes() == (tmp_path / "two" / "validation.jsonl").read_bytes()
    assert one["train"] + one["validation"] == n and 0 < one["validation"] < n
    assert not (src / "validation.jsonl").exists()  # dst mode leaves the source alone

    val_ids = set(load_skin_dataset(tmp_path / "one", split="validation")["row_id"])
    expected = {f"images/{i}.png" for i in range(n) if validation_fraction_of(f"images/{i}.png", 3) < 0.25}
    assert val_ids == expected

    # Add rows and re-split in place: no old row changes side.
    folder = tmp_path / "one"
    for i in range(n, n + 20):
        _save(folder / "images" / f"{i}.png", Image.new("RGB", (32, 16)))
    write_rows(folder, read_rows(folder) + [_row(i) for i in range(n, n + 20)])
    split_dataset(folder, val_fraction=0.25, seed=3)
    new_val = set(load_skin_dataset(folder, split="validation")["row_id"])
    assert new_val & {f"images/{i}.png" for i in range(n)} == val_ids
    # Another seed gives another split; fraction 0 puts every row back into train.
    split_dataset(folder, val_fraction=0.25, seed=4)
    assert set(load_skin_dataset(folder, split="validation")["row_id"]) != new_val
    split_dataset(folder, val_fraction=0.0)
    assert not (folder / "validation.jsonl").exists() and len(read_rows(folder)) == n + 20


def test_split_rejects_bad_fraction(tmp_path):
    with pytest.raises(SkingenError, match=r"--val_fraction must be in \[0, 1\)"):
        split_dataset(make_jsonl_dataset(tmp_path / "ds"), val_fraction=1.5)


def test_dataset_tool_validate_prints_report_and_exit_status(tmp_path):
    root = make_jsonl_dataset(tmp_path / "ds", [_row(0), _row(1, image="images/nope.png")], n=2)
    result = subprocess.run(
        [sys.executable, str(REPO / "dataset_tool.py"), "validate", str(root)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1, result.stderr
    assert "rows: 2   ok: 1   bad: 1" in result.stdout
    assert "problems: image not found x1" in result.stdout
    assert f"{root / 'train.jsonl'}:2: 'image' file 'images/nope.png' not found" in result.stdout
    assert "image sizes: 32x16 x1" in result.stdout

    write_rows(root, [_row(0), _row(1)])  # split refuses bad rows too
    result = subprocess.run(
        [sys.executable, str(REPO / "dataset_tool.py"), "split", str(root), "--val_fraction", "0.5"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "train.jsonl" in result.stdout and "validation.jsonl" in result.stdout

    result = subprocess.run(
        [sys.executable, str(REPO / "dataset_tool.py"), "validate", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert (
        result.returncode == 2 and result.stderr.startswith("error: ") and "dataset folder not found" in result.stderr
    )
