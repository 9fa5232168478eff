"""Reading Baidu .bds skins: INI text in UTF-8 with a BOM or GBK, broken and partial packages, zipped and unzipped
packages drawn with their own keyboards (exact boxes and strings), and the atlas merge with --element_map baidu."""

from __future__ import annotations

import codecs
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import merge_elements
from skingen.errors import SkingenError
from skingen.skins.bds.ini import parse_ini
from skingen.skins.bds.package import BdsPackage
from skingen.skins.bds.render import render_keyboard
from skingen.skins.bds.synthetic import PORT_SIZE, write_synthetic_bds


@pytest.fixture(scope="module")
def skins(tmp_path_factory, cjk_font):
    """Two synthetic packages of the same look: one unzipped folder, one .bds zip."""
    out = tmp_path_factory.mktemp("bds")
    folder = write_synthetic_bds(out, 0, seed=0, font=str(cjk_font), as_zip=False)
    (out / "z").mkdir()
    zipped = write_synthetic_bds(out / "z", 0, seed=0, font=str(cjk_font), as_zip=True)
    return folder, zipped


def test_ini_reads_utf8_with_bom_and_gbk_alike():
    text = "[KEY1]\r\nVIEW_RECT=1,2,30,40\r\nSHOW=分词\r\nNAMES=， 。 ；\r\n"
    for data in (codecs.BOM_UTF8 + text.encode("utf-8"), text.encode("gbk")):
        key = parse_ini(data, "py_9.ini").get("KEY1")
        assert key.rect("VIEW_RECT") == (1, 2, 30, 40)
        assert key.get("SHOW") == "分词"
        assert key.get("NAMES").split() == ["，", "。", "；"]  # a ';' in a value is text, not a comment


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("VIEW_RECT=1,2,3,4\n", "py_26.ini:1: VIEW_RECT= comes before any [SECTION]"),
        ("[KEY1]\nVIEW_RECT=1,2,three,4\n", "py_26.ini:2: [KEY1] VIEW_RECT must be x,y,w,h"),
        ("[KEY1]\n; comment\njust words\n", "py_26.ini:3: expected [SECTION] or KEY=value"),
        ("[KEY1]\nVIEW_RECT=1,2,0,4\n", "py_26.ini:2: [KEY1] VIEW_RECT=1,2,0,4 has no area"),
    ],
)
def test_bad_ini_lines_name_file_and_line(text, message):
    with pytest.raises(SkingenError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_ini(text.encode(), "py_26.ini").get("KEY1").rect("VIEW_RECT")


def test_text_neither_utf8_nor_gbk_is_an_error_with_its_line():
    with pytest.raises(SkingenError, match=r"default.css:2: neither UTF-8 nor GBK"):
        parse_ini(b"[STYLE1]\nSHOW=\xff\xff\n", "default.css")


def test_zipped_and_unzipped_packages_draw_the_same_keyboard(skins):
    folder, zipped = skins
    images = []
    for path in (folder, zipped):
        with BdsPackage(path) as package:
            rendered = render_keyboard(package, package.keyboard("py_26", "port"), 180)
            images.append(np.asarray(rendered.image))
            assert package.warnings == []
    assert images[0].shape == (120, 180, 3)  # the design's 360x240 at half width, aspect kept
    assert np.array_equal(images[0], images[1])


def test_package_keyboard_rows_have_exact_boxes_and_strings(skins, tmp_path):
    folder, zipped = skins
    merge_elements.main(["--package", str(folder), "--layout", "package", "--keyboard", "py_9", "--resolution", "180",
                         "--output_dir", str(tmp_path / "ds")])  # fmt: skip
    row = json.loads((tmp_path / "ds" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert row["keyboard"] == "py_9" and row["texts_exact"] is True
    texts = row["texts"]
    # the list panel's NAMES, the keys' SHOW strings; icon keys and bar icons have boxes but no string
    assert texts[2:6] == ["，", "。", "？", "！"]
    assert texts[6:15] == ["分词", "ABC", "DEF", "GHI", "JKL", "MNO", "PQRS", "TUV", "WXYZ"]
    assert "" in texts and "重输" in texts and "符号" in texts
    assert len(row["box"]) == len(texts) == 2 + 4 + 15
    # the ABC key: VIEW_RECT of the generator's geometry at half scale
    with BdsPackage(folder) as package:
        key = package.keyboard("py_9", "port").keys[1]
    x, y, w, h = key.rect
    assert row["box"][7] == [[x / 2, y / 2], [(x + w) / 2, y / 2], [(x + w) / 2, (y + h) / 2], [x / 2, (y + h) / 2]]
    image = Image.open(tmp_path / "ds" / row["image"])
    assert image.size == (180, 120)


def test_landscape_keyboard_and_unknown_keyboard(skins, tmp_path):
    folder, _ = skins
    with BdsPackage(folder) as package:
        land = render_keyboard(package, package.keyboard("py_26", "land"))
        assert land.image.size == (640, 200)
        assert "q" in land.texts and "中" in land.texts
        with pytest.raises(SkingenError, match=r"port/en_26.ini: no such keyboard.*py_26, py_9"):
            package.keyboard("en_26", "port")


def _edit(folder: Path, tmp_path: Path, relpath: str, old: str, new: str) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    path = copy / relpath
    data = path.read_bytes()
    encoding = "utf-8-sig" if data.startswith(codecs.BOM_UTF8) else "gbk"
    text = data.decode(encoding)
    assert old in text
    path.write_bytes(text.replace(old, new, 1).encode(encoding))
    return copy


def _line_of(path: Path, needle: str) -> int:
    data = path.read_bytes()
    text = data.decode("utf-8-sig" if data.startswith(codecs.BOM_UTF8) else "gbk")
    return next(i for i, line in enumerate(text.splitlines(), start=1) if line.strip().startswith(needle))


@pytest.mark.parametrize(
    ("relpath", "old", "new", "needle", "message"),
    [
        ("port/py_9.ini", "VIEW_RECT=", "VIEW_RECT=x", "VIEW_RECT=x", "VIEW_RECT must be x,y,w,h"),
        ("res/default.css", "NM_IMG=keys,1", "NM_IMG=keys", "NM_IMG=keys", "NM_IMG must be 'sheet,index'"),
        ("res/keys.til", "SOURCE_RECT=0,0,", "SOURCE_RECT=900,0,", "SOURCE_RECT=900", "lies outside .*keys.png"),
        ("res/default.css", "NM_IMG=keys,1", "NM_IMG=keys,9", "[STYLE10]", "sprite keys,9 but res/keys.til has 4"),
        ("port/py_9.ini", "KEY_NUM=15", "KEY_NUM=16", "KEY_NUM=16", r"KEY_NUM=16 but \[KEY16\] is missing"),
    ],
)
def test_broken_package_is_one_error_line_with_file_and_line(skins, tmp_path, capsys, relpath, old, new, needle, message):
    broken = _edit(skins[0], tmp_path, relpath, old, new)
    line = _line_of(broken / relpath, needle)  # a bad sprite index is reported at the style naming it
    with pytest.raises(SystemExit) as exit_info:
        merge_elements.run_cli(merge_elements.main, ["--package", str(broken), "--layout", "package", "--keyboard", "py_9",
                                                     "--output_dir", str(tmp_path / "ds")])  # fmt: skip
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # (tqdm's bar aside)
    assert len(err) == 1 and err[0].startswith("error: ")
    assert f"{broken / relpath}:{line}:" in err[0]
    assert re.search(message, err[0])


def test_missing_optional_parts_are_counted_warnings_and_missing_sheet_is_an_error(skins, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(skins[0], partial)
    (partial / "Info.txt").unlink()
    (partial / "demo.png").unlink()
    (partial / "port" / "cand.cnd").unlink()
    merge_elements.main(["--package", str(partial), "--layout", "package", "--output_dir", str(tmp_path / "ds")])
    report = json.loads((tmp_path / "ds" / "merge_report.json").read_text(encoding="utf-8"))
    warnings = report["warnings"]["partial"]
    assert len(warnings) == 3
    assert any("Info.txt: missing" in w for w in warnings) and any("cand.cnd is missing" in w for w in warnings)
    assert report["merged"] == 1 and report["demo_edge_f1"] == {}
    (partial / "res" / "letter.til").unlink()
    with pytest.raises(SkingenError, match=r"names sprite sheet 'letter' but .*res/letter.til is missing"):
        merge_elements.main(["--package", str(partial), "--layout", "package", "--output_dir", str(tmp_path / "ds2")])


def test_zip_slip_in_a_bds_is_refused(tmp_path):
    evil = tmp_path / "evil.bds"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../port/py_26.ini", "[PANEL]\n")
    with pytest.raises(SkingenError, match="unsafe zip entry"):
        BdsPackage(evil)


def test_not_a_baidu_package_is_a_clear_error(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "key.png").write_bytes(b"")
    with pytest.raises(SkingenError, match="not a Baidu skin package"):
        merge_elements.main(["--package", str(tmp_path / "plain"), "--layout", "package", "--output_dir", str(tmp_path / "ds")])


def test_render_matches_the_independently_drawn_demo(skins, tmp_path):
    merge_elements.main(["--package", str(skins[1]), "--layout", "package", "--output_dir", str(tmp_path / "ds")])
    report = json.loads((tmp_path / "ds" / "merge_report.json").read_text(encoding="utf-8"))
    assert report["demo_edge_f1_mean"] > 0.95
    assert Image.open(tmp_path / "ds" / "images" / f"{skins[1].stem}.png").size == PORT_SIZE


def test_atlas_merge_with_the_baidu_element_map(skins, tmp_path):
    merge_elements.main(["--package", str(skins[1]), "--layout", "key_elements", "--element_map", "baidu",
                         "--resolution", "512", "--output_dir", str(tmp_path / "ds")])  # fmt: skip
    row = json.loads((tmp_path / "ds" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    sources = {e["id"]: e["source"] for e in row["elements"]}
    assert sources["key_26_bg"] == "baidu/port/py_26/letter.back.png"
    assert sources["key_9_bg"] == "baidu/port/py_9/digit.back.png"
    assert sources["candidate_bar"] == "baidu/port/py_26/candidate_bar.back.png"
    shift = next(e for e in row["elements"] if e["id"] == "key_shift")
    assert [layer["source"] for layer in shift["layers"]] == ["baidu/port/py_26/shift.back.png", "baidu/port/py_26/shift.fore.png"]
    assert shift["ninepatch"] is not None  # the 9-slice INNER_RECT stays stretchable
    atlas = np.asarray(Image.open(tmp_path / "ds" / row["image"]).convert("RGB"))
    with BdsPackage(skins[1]) as package:
        bar = package.sprite(package.styles()["2"].normal, "").image.convert("RGB").getpixel((8, 8))
    x0, y0, x1, y1 = next(e["box"] for e in row["elements"] if e["id"] == "candidate_bar")
    assert tuple(atlas[(y0 + y1) // 2, (x0 + x1) // 2]) == bar  # the bar's own colour in its box


def test_rerun_skips_drawn_packages_and_redraws_at_another_size(skins, tmp_path, capsys):
    argv = ["--package", str(skins[0]), "--layout", "package", "--output_dir", str(tmp_path / "ds")]
    merge_elements.main([*argv, "--resolution", "180"])
    merge_elements.main([*argv, "--resolution", "180"])
    assert "1 already drawn, 0 to draw" in capsys.readouterr().out
    merge_elements.main([*argv, "--resolution", "240"])
    assert Image.open(tmp_path / "ds" / "images" / f"{skins[0].name}.png").size == (240, 160)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layout", "key_elements", "--keyboard", "py_9"], "use them with --layout package"),
        (["--layout", "package", "--element_map", "baidu"], "are for atlas layouts"),
        (["--layout", "package", "--format", "bds"], "--format chooses what --split writes"),
    ],
)
def test_flags_that_do_not_go_together(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        merge_elements.parse_args(["--packages_dir", str(tmp_path), "--output_dir", str(tmp_path / "ds"), *flags])
    assert message in capsys.readouterr().err
