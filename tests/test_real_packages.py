"""Packages built like real Android keyboard themes (tests/android_theme.py): element choice, layers, alpha,
the image opener, 9-patches, XML drawables, importable split packages and the merge's robustness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from android_theme import PRESSED, write_theme, write_themes
from PIL import Image

import merge_elements
from skingen.errors import SkingenError, run_cli
from skingen.skins.atlas import merge_package
from skingen.skins.element_maps import load_element_map
from skingen.skins.layout import load_layout
from skingen.skins.ninepatch import parse_ninepatch
from skingen.skins.package import open_package

REPO = Path(__file__).resolve().parent.parent
LAYOUT = load_layout("key_elements", 512)
ANDROID = load_element_map("android")
BOX = {e.id: e.box for e in LAYOUT.elements}


def run(*argv: str) -> None:
    merge_elements.main(list(argv))


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """The three themes merged with the android map: (packages dir, dataset dir, rows by package)."""
    root = tmp_path_factory.mktemp("android")
    write_themes(root / "packages")
    run("--packages_dir", str(root / "packages"), "--element_map", "android", "--output_dir", str(root / "dataset"))
    rows = [json.loads(line) for line in (root / "dataset" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return root / "packages", root / "dataset", {row["package"]: row for row in rows}


def atlas(dataset: Path, theme: str) -> np.ndarray:
    return np.asarray(Image.open(dataset / "images" / f"theme_{theme}.png")).astype(int)


def tile(pixels: np.ndarray, element_id: str) -> np.ndarray:
    x0, y0, x1, y1 = BOX[element_id]
    return pixels[y0:y1, x0:x1]


def layer(row: dict, element_id: str, role: str) -> dict:
    element = next(e for e in row["elements"] if e["id"] == element_id)
    return next(entry for entry in element["layers"] if entry["role"] == role)


def test_choice_prefers_normal_state_then_densest_folder_and_is_recorded(merged):
    _, dataset, rows = merged
    row = rows["theme_dark"]
    key = layer(row, "key_26_bg", "background")
    assert key["source"] == "res/drawable-xxhdpi/btn_keyboard_key_normal.9.png"  # not hdpi, not pressed, not the XML
    assert key["size"] == [60, 72] and key["ninepatch"]["stretch_x"] == [[13, 47]] and not key["tie"]
    assert key["candidates"] > 4 and "480 dpi" in key["chosen"]
    shift = layer(row, "key_shift", "background")
    assert shift["source"] == "res/drawable-xxhdpi/btn_keyboard_key_dark_normal.9.png"  # not _off, _on, _pressed
    assert layer(row, "key_shift", "icon")["source"] == "res/drawable-xhdpi/sym_keyboard_shift.png"  # not _locked
    # Pressed variants are pure red: no red pixel may reach the atlas' key tiles of the dark theme.
    pixels = atlas(dataset, "dark")
    for element_id in ("key_26_bg", "key_shift", "key_delete", "key_enter"):
        assert not np.all(tile(pixels, element_id) == PRESSED, axis=-1).any(), element_id


def test_ties_and_the_largest_image_rule_are_visible_in_verbose(tmp_path, capsys):
    package = write_theme(tmp_path / "pkgs" / "tied", "dark")
    for folder, size in (("theme_a", (40, 40)), ("theme_b", (40, 40)), ("theme_c", (20, 20))):
        (package / folder).mkdir()
        Image.new("RGBA", size, (255, 255, 255, 255)).save(package / folder / "sym_keyboard_delete.png")
    for old in package.glob("res/drawable-*/sym_keyboard_delete.png"):
        old.unlink()
    run(
        "--packages_dir",
        str(tmp_path / "pkgs"),
        "--element_map",
        "android",
        "--output_dir",
        str(tmp_path / "ds"),
        "--verbose",
    )
    out = capsys.readouterr().out
    line = next(text for text in out.splitlines() if "key_delete.icon" in text)
    assert "theme_a/sym_keyboard_delete.png" in line and "largest (40x40)" in line and "TIE" in line
    row = json.loads((tmp_path / "ds" / "train.jsonl").read_text(encoding="utf-8"))
    assert layer(row, "key_delete", "icon")["tie"] is True
    assert "key_26_bg.background: res/drawable-xxhdpi/btn_keyboard_key_normal.9.png" in out


def test_manifest_wins_over_the_map_and_names_missing_elements(tmp_path):
    package = write_theme(tmp_path / "pkg", "dark")
    (package / "skin.yaml").write_text(
        textwrap.dedent("""\
        elements:
          key_shift:
            background: res/drawable-mdpi/btn_keyboard_key_dark_pressed.9.png
            icon: res/drawable-mdpi/sym_keyboard_shift_locked.png
            label: {text: "大写", colour: "#00ff00", size: 0.2}
        missing: [key_emoji]
        """),
        encoding="utf-8",
    )
    _, placements = merge_package(package, LAYOUT, ANDROID)
    by_id = {p["id"]: p for p in placements}
    assert by_id["key_shift"]["source"] == "res/drawable-mdpi/btn_keyboard_key_dark_pressed.9.png"
    assert [entry["role"] for entry in by_id["key_shift"]["layers"]] == ["background", "icon", "label"]
    assert by_id["key_shift"]["layers"][2]["text"] == "大写"
    assert "key_emoji" not in by_id and "key_delete" in by_id  # the map still finds what the manifest leaves out
    (package / "skin.yaml").write_text("elements:\n  key_shift: no_such_file.png\n", encoding="utf-8")
    with pytest.raises(
        SkingenError, match=r"skin.yaml: element 'key_shift': background file 'no_such_file.png' is not in"
    ):
        merge_package(package, LAYOUT, ANDROID)


def test_icons_keep_their_native_size_and_labels_are_drawn(merged):
    _, dataset, rows = merged
    shift_icon = layer(rows["theme_dark"], "key_shift", "icon")
    assert shift_icon["native"] == [32, 32] and shift_icon["fit"] == "icon"
    x0, y0, x1, y1 = shift_icon["drawn"]
    assert (x1 - x0, y1 - y0) == (32, 32)  # fit: contain would blow it up to the 80-px key width
    pixels = tile(atlas(dataset, "dark"), "key_shift")
    white = np.all(pixels > 200, axis=-1)
    rows_with_white = np.flatnonzero(white.any(axis=1))
    assert 20 <= rows_with_white.max() - rows_with_white.min() + 1 <= 32
    label = tile(atlas(dataset, "dark"), "key_num")  # "?123" comes from the map: the app draws it, no image has it
    assert np.all(label > 200, axis=-1).sum() > 30
    assert layer(rows["theme_dark"], "key_num", "label")["text"] == "?123"


def test_transparent_and_semi_transparent_keys_show_the_keyboard_background(merged):
    _, dataset, _ = merged
    dark = tile(atlas(dataset, "dark"), "key_26_bg")
    centre = dark[40:60, 30:40].reshape(-1, 3)
    assert centre.max() < 60  # the dark keyboard background, not the white canvas
    semi = tile(atlas(dataset, "semi"), "key_26_bg")
    backdrop = tile(atlas(dataset, "semi"), "keyboard_bg")
    assert semi[50, 36].min() > backdrop.min() + 20 and semi[50, 36].max() < 250  # white at alpha 80 over blue


def test_element_images_go_through_the_one_opener(merged):
    _, dataset, _ = merged
    pixels = atlas(dataset, "light")
    space = tile(pixels, "key_space")
    centre = space[space.shape[0] // 2, space.shape[1] // 2]
    assert np.abs(centre - 156).max() <= 2  # 16-bit grey 40000 scaled to 8 bits, not clipped to white
    background = tile(pixels, "keyboard_bg")
    top, bottom = background[5].mean(axis=0), background[-5].mean(axis=0)
    assert top[0] > 180 and top[1] < 80 and bottom.min() > 200  # EXIF orientation applied: red on top


def test_ninepatch_keeps_its_behaviour_under_cover(merged):
    _, dataset, rows = merged
    keyboard = next(e for e in rows["theme_semi"]["elements"] if e["id"] == "keyboard_bg")
    assert keyboard["fit"] == "cover" and keyboard["ninepatch"]["stretch_y"] == [[40, 160]]
    column = tile(atlas(dataset, "semi"), "keyboard_bg")[:, 100, 2]
    assert column[:40].mean() > 140 and column[-10:].mean() < 40  # the gradient, not one flat colour
    assert np.abs(column[:40] - column[:40].mean()).max() < 60  # fixed band kept (40 rows)


def test_thin_strips_fit_in_bounded_memory():
    """Any strip into a 1024-px box, under every fit, stays far below 200 MB (a subprocess measures its peak)."""
    code = textwrap.dedent("""
        import resource
        import numpy as np
        from PIL import Image
        from skingen.skins.atlas import draw_layer
        from skingen.skins.ninepatch import parse_ninepatch, encode_ninepatch
        strips = [Image.new("RGBA", (1, 2000), (1, 2, 3, 255)), Image.new("RGBA", (2, 200), (9, 9, 9, 255)),
                  Image.new("RGBA", (2000, 1), (5, 5, 5, 255))]
        strips.append(parse_ninepatch(encode_ninepatch(strips[1], ((0, 2),), ((50, 150),))))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for strip in strips:
            for fit in ("stretch", "contain", "cover", "nine_patch", "icon"):
                assert draw_layer(strip, fit, (1024, 1024)).tile.size == (1024, 1024)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert float(result.stdout.strip()) < 200


def test_many_packages_with_warnings_print_a_few_and_count_the_rest(tmp_path, capsys):
    for index in range(5):
        package = write_theme(tmp_path / "pkgs" / f"plain{index}", "dark")
        for nine in package.glob("res/drawable-*/btn_keyboard_key_*.9.png"):
            parse_ninepatch(Image.open(nine)).image.save(nine.with_name(nine.name.replace(".9.png", ".png")))
            nine.unlink()
    run("--packages_dir", str(tmp_path / "pkgs"), "--element_map", "android", "--output_dir", str(tmp_path / "ds"))
    captured = capsys.readouterr()
    warnings = [line for line in (captured.out + captured.err).splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4 and all("plain image(s) in 9-patch box(es)" in line for line in warnings[:3])
    assert "2 more package(s) with warnings (5 in all)" in warnings[3] and "merge_report.json" in warnings[3]
    report = json.loads((tmp_path / "ds" / "merge_report.json").read_text(encoding="utf-8"))
    assert sorted(report["warnings"]) == [f"plain{index}" for index in range(5)]


def test_plain_image_in_a_ninepatch_box_warns_once_per_package(tmp_path, capsys):
    package = write_theme(tmp_path / "pkgs" / "plain", "dark")
    for nine in package.glob("res/drawable-*/btn_keyboard_key_*.9.png"):
        content = parse_ninepatch(Image.open(nine)).image
        content.save(nine.with_name(nine.name.replace(".9.png", ".png")))
        nine.unlink()
    run("--packages_dir", str(tmp_path / "pkgs"), "--element_map", "android", "--output_dir", str(tmp_path / "ds"))
    captured = capsys.readouterr()
    warnings = [line for line in (captured.out + captured.err).splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "plain: plain image(s) in 9-patch box(es)" in warnings[0]
    assert "key_26_bg (res/drawable-xxhdpi/btn_keyboard_key_normal.png)" in warnings[0]
    report = json.loads((tmp_path / "ds" / "merge_report.json").read_text(encoding="utf-8"))
    assert list(report["warnings"]) == ["plain"]


def test_xml_shapes_render_and_other_xml_drawables_are_named(merged, tmp_path):
    _, dataset, rows = merged
    bar = next(e for e in rows["theme_light"]["elements"] if e["id"] == "candidate_bar")
    assert bar["source"] == "res/drawable/keyboard_suggest_strip.xml"
    pixels = tile(atlas(dataset, "light"), "candidate_bar")
    assert pixels[2, 256, 2] > 170 and pixels[2, 256, 0] < 60  # #2060C0 at the top (angle 270: top -> bottom)
    assert pixels[-3, 256, 0] > 100  # #80C0FF at the bottom
    package = write_theme(tmp_path / "pkg", "light")
    (package / "res/drawable/keyboard_suggest_strip.xml").write_text(
        '<layer-list xmlns:android="http://schemas.android.com/apk/res/android"/>', encoding="utf-8"
    )
    with pytest.raises(SkingenError, match=r"keyboard_suggest_strip.xml': XML drawable <layer-list> is not drawn"):
        merge_package(package, LAYOUT, ANDROID)
    with open_package(package) as opened:  # a <selector> follows its normal-state item to the PNG
        selector = opened.load_element("res/drawable/btn_keyboard_key.xml")
    assert selector.image.size == (60, 72)


def test_split_gives_an_importable_package_that_merges_back_to_the_same_atlas(merged, tmp_path):
    _, dataset, rows = merged
    out = tmp_path / "split"
    run("--split", "--input", str(dataset / "images"), "--dataset_dir", str(dataset), "--output_dir", str(out))
    package = out / "theme_dark"
    names = sorted(p.name for p in package.iterdir())
    assert "btn_keyboard_key_normal.9.png" in names and "keyboard_background.png" in names and "skin.yaml" in names
    key = Image.open(package / "btn_keyboard_key_normal.9.png")
    parsed = parse_ninepatch(key)  # valid markers, the source's own
    assert parsed.image.size == (60, 72) and parsed.stretch_x == ((13, 47),) and parsed.padding == (12, 12, 12, 12)
    assert key.mode == "RGBA" and np.asarray(parsed.image)[0, 0, 3] == 0  # rounded corner stays transparent
    shift = parse_ninepatch(Image.open(package / "key_shift.9.png"))  # key + icon: bands avoid the icon
    icon_box = layer(rows["theme_dark"], "key_shift", "icon")["drawn"]
    assert all(b <= icon_box[0] or a >= icon_box[2] for a, b in shift.stretch_x)
    assert Image.open(out / "theme_light" / "keyboard_background.jpg").format == "JPEG"

    again = tmp_path / "again"
    run("--packages_dir", str(out), "--output_dir", str(again))
    for theme in ("dark", "semi", "light"):
        first = atlas(dataset, theme)
        second = np.asarray(Image.open(again / "images" / f"theme_{theme}.png")).astype(int)
        difference = np.abs(first - second)
        assert difference.mean() < 1.0 and np.percentile(difference, 99.9) <= 12, theme


def test_split_writes_no_file_for_an_element_the_package_lacked(tmp_path):
    package = write_theme(tmp_path / "pkgs" / "no_emoji", "dark")
    for icon in package.glob("res/drawable-*/sym_keyboard_smiley.png"):
        icon.unlink()
    (package / "skin.yaml").write_text("missing: [key_emoji]\nelements: {}\n", encoding="utf-8")
    run("--packages_dir", str(tmp_path / "pkgs"), "--element_map", "android", "--output_dir", str(tmp_path / "ds"))
    run(
        "--split",
        "--input",
        str(tmp_path / "ds" / "images"),
        "--dataset_dir",
        str(tmp_path / "ds"),
        "--output_dir",
        str(tmp_path / "out"),
    )
    split = tmp_path / "out" / "no_emoji"
    assert not (split / "key_emoji.9.png").exists() and "key_emoji" in (split / "skin.yaml").read_text()
    run("--packages_dir", str(tmp_path / "out"), "--output_dir", str(tmp_path / "again"))
    row = json.loads((tmp_path / "again" / "train.jsonl").read_text(encoding="utf-8"))
    assert "key_emoji" not in {e["id"] for e in row["elements"]}  # not re-merged as a blank tile


def test_generated_atlas_splits_with_layout_insets_and_shapes(tmp_path):
    generated = Image.new("RGB", LAYOUT.size, (40, 120, 200))
    generated.save(tmp_path / "gen.png")
    run("--split", "--input", str(tmp_path / "gen.png"), "--output_dir", str(tmp_path / "out"))
    key = Image.open(tmp_path / "out" / "gen" / "key_shift.9.png")
    parsed = parse_ninepatch(key)
    assert parsed.image.size == (80, 104) and parsed.stretch_x == ((12, 68),) and parsed.stretch_y == ((12, 92),)
    alpha = np.asarray(parsed.image)[..., 3]
    assert alpha[0, 0] == 0 and alpha[52, 40] == 255  # corner_radius: rounded, not a white square


def test_symlinks_out_of_a_package_are_refused(tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    package = write_theme(tmp_path / "pkgs" / "linked", "dark")
    os.symlink(secret, package / "res" / "drawable" / "keyboard_background_link.png")
    with pytest.raises(
        SkingenError,
        match=r"'res/drawable/keyboard_background_link.png' is a symbolic link to .*secret.png, outside the package",
    ):
        run("--packages_dir", str(tmp_path / "pkgs"), "--output_dir", str(tmp_path / "ds"))
    archive = tmp_path / "zipped.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        info = zipfile.ZipInfo("res/drawable/keyboard_background.png")
        info.external_attr = 0o120777 << 16
        zipped.writestr(info, "../../../etc/passwd")
    with pytest.raises(
        SkingenError, match=r"zipped.zip: zip entry 'res/drawable/keyboard_background.png' is a symbolic link"
    ):
        open_package(archive)


def test_a_killed_merge_keeps_the_rows_it_finished(tmp_path):
    """Rows are saved as packages finish (every FLUSH_SECONDS, here 0): a kill -9 at the 4th package keeps 3."""
    for index in range(5):
        write_theme(tmp_path / "pkgs" / f"p{index}", "dark")
    code = textwrap.dedent(f"""
        import os, merge_elements
        merge_elements.FLUSH_SECONDS = 0.0
        real, count = merge_elements.compose_package, [0]
        def dying(*args, **kwargs):
            count[0] += 1
            if count[0] == 4:
                os._exit(9)
            return real(*args, **kwargs)
        merge_elements.compose_package = dying
        merge_elements.main(["--packages_dir", {str(tmp_path / "pkgs")!r}, "--element_map", "android",
                             "--output_dir", {str(tmp_path / "ds")!r}])
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 9
    rows = [json.loads(line)["package"] for line in (tmp_path / "ds" / "train.jsonl").read_text().splitlines()]
    assert rows == ["p0", "p1", "p2"]


@pytest.mark.parametrize("kind", ["no packages", "empty package", "nothing merged"])
def test_nothing_to_merge_is_an_error(tmp_path, capsys, kind):
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    expected = {
        "no packages": "no skin packages inside",
        "empty package": "the package is empty",
        "nothing merged": "no package could be merged",
    }[kind]
    if kind != "no packages":
        (pkgs / "empty").mkdir()
    extra = ["--skip_incomplete"] if kind == "nothing merged" else []
    with pytest.raises(SystemExit) as exited:
        run_cli(merge_elements.main, ["--packages_dir", str(pkgs), "--output_dir", str(tmp_path / "ds"), *extra])
    assert exited.value.code == 2 and expected in capsys.readouterr().err


def test_whole_keyboard_layouts_keep_their_aspect_ratio(tmp_path):
    preview = Image.new("RGB", (1080, 675), (10, 200, 30))
    (tmp_path / "pkg").mkdir()
    preview.save(tmp_path / "pkg" / "preview.png")
    image, _ = merge_package(tmp_path / "pkg", load_layout("full_keyboard", 1024))
    assert image.size == (1024, 640) and np.asarray(image)[5, 5, 1] == 200  # filled, not letterboxed


@pytest.mark.parametrize("mode", ["I;16", "LA", "P", "CMYK", "RGBA", "exif"])
def test_the_rgba_opener_agrees_with_the_dataset_opener(mode):
    """Element images keep their alpha; composited on white they look exactly as the dataset opener shows them."""
    from PIL import ImageOps

    from skingen.data.images import to_rgb
    from skingen.skins.drawables import to_rgba

    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (6, 5, 4), dtype=np.uint8), "RGBA")
    image = {
        "I;16": Image.fromarray(rng.integers(0, 65536, (6, 5), dtype=np.uint16)),
        "LA": base.convert("LA"),
        "P": base.convert("RGB").quantize(8),
        "CMYK": base.convert("CMYK"),
        "RGBA": base,
        "exif": base.convert("RGB"),
    }[mode]
    if mode == "P":
        image.info["transparency"] = 0
    if mode == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6
        image.info["exif"] = exif.tobytes()
        image.getexif()[0x0112] = 6
    rgba = to_rgba(image)
    white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    assert np.array_equal(np.asarray(white), np.asarray(to_rgb(image)))
    if mode == "exif":
        assert rgba.size == (6, 5) and ImageOps.exif_transpose(image).size == (6, 5)


def test_split_removes_what_a_killed_split_left(tmp_path):
    Image.new("RGB", LAYOUT.size, (9, 9, 9)).save(tmp_path / "gen.png")
    out = tmp_path / "out"
    (out / ".gen.abc123").mkdir(parents=True)  # a package folder a killed run was building
    (out / ".gen.abc123" / "key_shift.9.png").write_bytes(b"half")
    (out / ".skin.yaml.x1.tmp").write_text("half")
    run("--split", "--input", str(tmp_path / "gen.png"), "--output_dir", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["gen"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: m\nelements:\n  key_shift: {icon: []}\n", r"element 'key_shift': 'icon' must be a file-name glob"),
        ("name: m\nelements:\n  key_shift: {sticker: [a]}\n", r"element 'key_shift': unknown key\(s\) \['sticker'\]"),
        (
            "name: m\nelements:\n  key_num: {label: {text: '123', size: 3}}\n",
            r"label 'size' is a share of the box height",
        ),
        (
            "name: m\nelements:\n  key_num: {label: {text: '123', colour: red}}\n",
            r"colour 'red' is not drawn by skingen",
        ),
        ("name: m\nelements: [\n", r"map.yaml:\d+: invalid YAML"),
        ("name: m\nelements:\n  no_such_element: [a*]\n", r"names none of the elements of layout 'key_elements'"),
    ],
)
def test_element_map_mistakes_name_the_file_and_the_fix(tmp_path, text, expected):
    from skingen.skins.element_maps import check_map_against_layout

    path = tmp_path / "map.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SkingenError, match=expected) as err:
        check_map_against_layout(load_element_map(path), LAYOUT)
    assert str(path) in str(err.value)
    with pytest.raises(SkingenError, match=r"no such map .* available: android"):
        load_element_map("no_such_map")


def test_xml_colour_references_and_broken_xml_are_named(tmp_path):
    package = write_theme(tmp_path / "pkg", "light")
    strip = package / "res/drawable/keyboard_suggest_strip.xml"
    strip.write_text(SHAPE_REFERENCE, encoding="utf-8")
    with pytest.raises(SkingenError, match=r"keyboard_suggest_strip.xml': <solid>: colour '@color/bar' is not drawn"):
        merge_package(package, LAYOUT, ANDROID)
    strip.write_text("<shape>\n<solid\n", encoding="utf-8")
    with pytest.raises(SkingenError, match=r"keyboard_suggest_strip.xml':\d+: not well-formed XML"):
        merge_package(package, LAYOUT, ANDROID)


SHAPE_REFERENCE = """<shape xmlns:android="http://schemas.android.com/apk/res/android">
    <solid android:color="@color/bar"/>
</shape>
"""


def test_split_ignores_a_record_of_other_boxes(merged, tmp_path, capsys):
    _, dataset, _ = merged
    big = Image.open(dataset / "images" / "theme_dark.png").resize((1024, 1024))
    big.save(tmp_path / "theme_dark.png")
    run(
        "--split",
        "--input",
        str(tmp_path / "theme_dark.png"),
        "--dataset_dir",
        str(dataset),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert "merged with other boxes" in capsys.readouterr().out
    assert (tmp_path / "out" / "theme_dark" / "key_shift.9.png").is_file()  # the layout's names, box sizes
    assert Image.open(tmp_path / "out" / "theme_dark" / "keyboard_bg.png").size == (480, 416)


def test_a_zipped_theme_with_a_top_folder_and_manifest_merges_like_the_folder(tmp_path):
    folder = write_theme(tmp_path / "folder", "semi")
    (folder / "skin.yaml").write_text("elements:\n  key_shift: res/drawable-mdpi/btn_keyboard_key_dark_on.9.png\n")
    archive = tmp_path / "zipped.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            zipped.write(path, f"theme/{path.relative_to(folder).as_posix()}")
    from_folder, _ = merge_package(folder, LAYOUT, ANDROID)
    from_zip, placements = merge_package(archive, LAYOUT, ANDROID)
    assert np.array_equal(np.asarray(from_folder), np.asarray(from_zip))
    shift = next(p for p in placements if p["id"] == "key_shift")
    assert shift["source"] == "theme/res/drawable-mdpi/btn_keyboard_key_dark_on.9.png"  # the manifest, in the zip
