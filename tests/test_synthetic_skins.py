"""scripts/make_synthetic_skins.py: deterministic, varied packages that every shipped layout merges,
with nav-bar text OCR can read at 512 px."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from repo_scripts import load_script

import merge_elements
from skingen.errors import SkingenError
from skingen.skins.atlas import merge_package
from skingen.skins.layout import load_layout
from skingen.skins.ninepatch import parse_ninepatch
from skingen.skins.package import find_elements, list_packages, open_package

synthetic = load_script("scripts/make_synthetic_skins.py")


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def skins(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("skins")
    synthetic.main(["--out", str(out), "--n", "8", "--seed", "0"])
    return out


def test_same_seed_gives_identical_bytes_and_another_seed_differs(skins, tmp_path):
    synthetic.main(["--out", str(tmp_path / "again"), "--n", "8", "--seed", "0"])
    assert digest(tmp_path / "again") == digest(skins)
    synthetic.main(["--out", str(tmp_path / "other"), "--n", "8", "--seed", "1"])
    other = digest(tmp_path / "other")
    assert set(other.values()).isdisjoint(digest(skins).values())


def test_defaults_mix_zips_ninepatches_and_naming_conventions(skins):
    packages = list_packages(skins)
    assert len(packages) == 8
    assert 0 < sum(p.suffix == ".zip" for p in packages) < 8
    ninepatch_files, names = 0, set()
    for path in packages:
        with open_package(path) as package:
            names.update(Path(f).name for f in package.files)
            for f in package.files:
                if f.endswith(".9.png"):
                    ninepatch_files += 1
                    parse_ninepatch(package.open_image(f), source=f)  # every 9-patch is well formed
    assert ninepatch_files > 0
    assert {"bar_candidate.png", "candidate_bar_bg.png", "topbar.png"} & names  # several conventions in use
    assert len({n for n in names if "candidate" in n or "topbar" in n}) >= 2


def test_fractions_zero_and_one_are_respected(tmp_path):
    synthetic.main(["--out", str(tmp_path / "a"), "--n", "3", "--zip_fraction", "1", "--ninepatch_fraction", "0"])
    packages = list_packages(tmp_path / "a")
    assert all(p.suffix == ".zip" for p in packages)
    for path in packages:
        with open_package(path) as package:
            assert not any(f.endswith(".9.png") for f in package.files)
    synthetic.main(["--out", str(tmp_path / "b"), "--n", "2", "--zip_fraction", "0", "--ninepatch_fraction", "1"])
    key_layout = load_layout("key_elements")
    for path in list_packages(tmp_path / "b"):
        assert path.is_dir()
        with open_package(path) as package:
            found = find_elements(package, key_layout).found
        keys = [source for element_id, source in found.items() if element_id.startswith("key_") and element_id != "key_9_bg"]
        assert len(keys) >= 8 and all(f.endswith(".9.png") for f in keys)


@pytest.mark.parametrize("layout", ["key_elements", "four_parts", "full_keyboard"])
def test_every_shipped_layout_merges_every_package(skins, tmp_path, layout):
    dataset = tmp_path / layout
    merge_elements.main(["--packages_dir", str(skins), "--layout", layout, "--resolution", "512",
                         "--output_dir", str(dataset)])
    rows = [json.loads(line) for line in (dataset / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8
    required = {e.id for e in load_layout(layout).elements if e.required}
    for row in rows:
        assert required <= {p["id"] for p in row["elements"]}
        image = np.asarray(Image.open(dataset / row["image"]))
        assert image.shape == (load_layout(layout).height, 512, 3) and image.std() > 10  # drawn, not an empty canvas


def test_nav_bar_words_are_readable_by_ocr_at_512(skins):
    from skingen.prep.ocr import get_ocr

    layout = load_layout("key_elements", 512)
    x0, y0, x1, y1 = next(e.box for e in layout.elements if e.id == "candidate_bar")
    ocr = get_ocr()
    for package in list_packages(skins)[:3]:
        atlas, _ = merge_package(package, layout)
        # Recognition on the bar right of its round icon (the words are one line there).
        [(text, _score)] = ocr.recognize([np.asarray(atlas.crop((x0 + (y1 - y0), y0, x1, y1)))])
        words = text.split()
        assert {"前往", "搜索", "设置"} <= set(words), (package.name, text)
        assert set(words) <= set(synthetic.NAV_WORDS)


def test_missing_font_is_a_clear_error(tmp_path):
    with pytest.raises(SkingenError, match="no-such-font.ttf: file not found"):
        synthetic.main(["--out", str(tmp_path), "--n", "1", "--font", str(tmp_path / "no-such-font.ttf")])


def _element_images(package_path: Path, element_id: str) -> np.ndarray:
    with open_package(package_path) as package:
        source = find_elements(package, load_layout("key_elements")).found[element_id]
        return np.asarray(package.open_image(source).convert("RGBA"))


def test_picture_backgrounds_are_large_shapes_placed_per_skin(tmp_path):
    for fraction in ("0", "1"):
        synthetic.main(["--out", str(tmp_path / fraction), "--n", "4", "--seed", "3", "--zip_fraction", "0",
                        "--ninepatch_fraction", "0", "--picture_fraction", fraction])
    shape_masks = []
    for plain_path, picture_path in zip(list_packages(tmp_path / "0"), list_packages(tmp_path / "1")):
        plain = _element_images(plain_path, "keyboard_bg")[..., :3].astype(int)
        picture = _element_images(picture_path, "keyboard_bg")[..., :3].astype(int)
        assert plain.shape == picture.shape  # the picture is the only change: same skin otherwise
        changed = np.abs(picture - plain).sum(axis=-1) > 60  # shapes are far in value from the background
        assert 0.05 < changed.mean() < 0.95, changed.mean()
        shape_masks.append(np.asarray(Image.fromarray(changed).resize((64, 48), Image.NEAREST)))  # skins differ in scale
    for i, a in enumerate(shape_masks):  # each skin's shapes are in places of its own
        for b in shape_masks[i + 1:]:
            assert (a & b).sum() / (a | b).sum() < 0.8


def test_keys_are_solid_see_through_or_outlined(skins):
    centre_alpha = []
    for path in list_packages(skins):
        key = _element_images(path, "key_26_bg")  # a blank key: its centre is the key's fill
        centre_alpha.append(int(key[key.shape[0] // 2, key.shape[1] // 2, 3]))
    assert any(alpha >= 200 for alpha in centre_alpha)  # solid keys
    assert any(alpha < 160 for alpha in centre_alpha)  # the background shows through others
