"""Writing keyboard images back as .bds packages: the source package's structure, a zip as the app imports it, and
the round trip (drawing the written package gives the image back exactly); the stock template without a source."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageFilter

import merge_elements
from skingen.skins.bds.package import BdsPackage
from skingen.skins.bds.render import render_keyboard
from skingen.skins.bds.synthetic import write_synthetic_bds


@pytest.fixture(scope="module")
def package_dataset(tmp_path_factory, cjk_font):
    out = tmp_path_factory.mktemp("bdsw")
    (out / "skins").mkdir()
    for index in range(2):
        write_synthetic_bds(out / "skins", index, seed=1, font=str(cjk_font), as_zip=index == 0)
    merge_elements.main(["--packages_dir", str(out / "skins"), "--layout", "package", "--keyboard", "py_9",
                         "--resolution", "200", "--output_dir", str(out / "ds")])  # fmt: skip
    return out / "ds"


def _draw(path, keyboard, width):
    with BdsPackage(path) as package:
        return render_keyboard(package, package.keyboard(keyboard, "port"), width)


@pytest.mark.parametrize("edit", ["same", "generated"])
def test_written_bds_reads_back_equal(package_dataset, tmp_path, edit):
    images = tmp_path / "generated"
    images.mkdir()
    for path in sorted((package_dataset / "images").iterdir()):
        image = Image.open(path).convert("RGB")
        if edit == "generated":  # stands for a generated skin: other pixels everywhere, same size
            image = Image.fromarray(255 - np.asarray(image.filter(ImageFilter.GaussianBlur(2))))
        image.save(images / path.name)
    merge_elements.main(["--split", "--format", "bds", "--input", str(images), "--dataset_dir", str(package_dataset),
                         "--output_dir", str(tmp_path / "out")])  # fmt: skip
    rows = {json.loads(line)["package"]: json.loads(line) for line in (package_dataset / "train.jsonl").read_text(encoding="utf-8").splitlines()}
    for path in sorted(images.iterdir()):
        written = tmp_path / "out" / f"{path.stem}.bds"
        back = _draw(written, "py_9", 200)
        assert np.array_equal(np.asarray(back.image), np.asarray(Image.open(path).convert("RGB")))
        assert back.texts == rows[path.stem]["texts"]  # the keys still say what they type
        with BdsPackage(written) as package:
            assert package.info()["Name"] == path.stem
            assert package.warnings == []
            # the other keyboards keep the source package's look
            source = rows[path.stem]["source_package"]
            assert np.array_equal(np.asarray(render_keyboard(package, package.keyboard("py_26", "port")).image),
                                  np.asarray(_draw(source, "py_26", None).image))  # fmt: skip


def test_written_zip_has_the_package_structure(package_dataset, tmp_path):
    image = next((package_dataset / "images").iterdir())
    merge_elements.main(["--split", "--format", "bds", "--input", str(image), "--dataset_dir", str(package_dataset),
                         "--output_dir", str(tmp_path / "out")])  # fmt: skip
    with zipfile.ZipFile(tmp_path / "out" / f"{image.stem}.bds") as archive:
        names = archive.namelist()
        assert names[:2] == ["Info.txt", "demo.png"]
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())
        assert not any(name.endswith("/") for name in names)
        tops = [name.split("/")[0] for name in names[2:]]
        assert tops == sorted(tops, key=["port", "land", "res"].index)
        sheet = "res/skingen_py_9_port"
        assert {f"{sheet}.png", f"{sheet}.til", f"{sheet}_hl.png", f"{sheet}_hl.til", "port/py_9.ini", "res/default.css"} <= set(names)
        css = archive.read("res/default.css").decode("utf-8-sig")
        assert "NM_IMG=skingen_py_9_port,1" in css and "HL_IMG=skingen_py_9_port_hl,1" in css


def test_rerun_keeps_written_packages_and_stock_template_without_a_source(tmp_path, capsys):
    image = Image.new("RGB", (180, 120), (40, 90, 160))
    image.paste((250, 250, 250), (20, 30, 60, 70))
    image.save(tmp_path / "mine.png")
    argv = ["--split", "--format", "bds", "--input", str(tmp_path / "mine.png"), "--output_dir", str(tmp_path / "out")]
    merge_elements.main(argv)
    back = _draw(tmp_path / "out" / "mine.bds", "py_26", 180)  # the stock template is a 26-key pinyin keyboard
    assert np.array_equal(np.asarray(back.image), np.asarray(image))
    assert "q" in back.texts
    stamp = (tmp_path / "out" / "mine.bds").stat().st_mtime_ns
    merge_elements.main(argv)
    assert (tmp_path / "out" / "mine.bds").stat().st_mtime_ns == stamp
    assert "(1 already there)" in capsys.readouterr().out


def test_atlas_from_a_bds_is_written_back_into_its_package(tmp_path, cjk_font):
    skin = write_synthetic_bds(tmp_path, 3, seed=2, font=str(cjk_font), as_zip=True)
    merge = ["--layout", "key_elements", "--element_map", "baidu", "--resolution", "512"]
    merge_elements.main(["--package", str(skin), *merge, "--output_dir", str(tmp_path / "ds")])
    generated = tmp_path / "generated"
    generated.mkdir()
    atlas = Image.open(tmp_path / "ds" / "images" / f"{skin.stem}.png").convert("RGB")
    Image.fromarray(255 - np.asarray(atlas)).save(generated / f"{skin.stem}.png")  # a new look, same layout
    merge_elements.main(["--split", "--format", "bds", "--input", str(generated), "--dataset_dir", str(tmp_path / "ds"),
                         "--layout", "key_elements", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    merge_elements.main(["--package", str(tmp_path / "out" / f"{skin.stem}.bds"), *merge, "--output_dir", str(tmp_path / "back")])
    back = np.asarray(Image.open(tmp_path / "back" / "images" / f"{skin.stem}.png").convert("RGB")).astype(int)
    wanted = np.asarray(Image.open(generated / f"{skin.stem}.png")).astype(int)
    row = json.loads((tmp_path / "back" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    boxes = {e["id"]: e["box"] for e in row["elements"]}
    for element in ("candidate_bar", "key_26_bg", "key_9_bg", "keyboard_bg"):  # one style each: written back
        x0, y0, x1, y1 = boxes[element]
        assert np.abs(back[y0:y1, x0:x1] - wanted[y0:y1, x0:x1]).mean() < 1.0, element
    # the package's own keyboard now draws its letter keys with the new sprite
    with BdsPackage(tmp_path / "out" / f"{skin.stem}.bds") as package, BdsPackage(skin) as source:
        old = render_keyboard(source, source.keyboard("py_26", "port")).image
        new = render_keyboard(package, package.keyboard("py_26", "port")).image
        x, y, w, h = next(k.rect for k in source.keyboard("py_26", "port").keys if k.values.get("CENTER") == "a")
    centre_old, centre_new = np.asarray(old)[y + 3, x + w // 2], np.asarray(new)[y + 3, x + w // 2]
    assert np.abs(centre_new.astype(int) - (255 - centre_old.astype(int))).max() <= 2
