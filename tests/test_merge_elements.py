"""merge_elements.py end to end: merge -> split round trips, packages as folders and zips, bad packages,
--skip_incomplete, resuming, and the atomic outputs."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

import merge_elements
from skingen.errors import SkingenError
from skingen.skins.atlas import merge_package
from skingen.skins.layout import load_layout

KEY_ELEMENTS_512 = load_layout("key_elements", 512)


def noise(size, seed: int, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def smooth(size, seed: int) -> Image.Image:
    """Low-frequency colour field: survives a resize down and up with little error."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def write_package(folder, layout, make_image, scale: float = 1.0, skip=()) -> dict[str, Image.Image]:
    """A package with one file per element, named by its split_name; returns the images by element id."""
    folder.mkdir(parents=True)
    images = {}
    for i, element in enumerate(layout.elements):
        if element.id in skip:
            continue
        w, h = element.size
        images[element.id] = make_image((round(w * scale), round(h * scale)), i)
        images[element.id].save(folder / element.split_name)
    return images


def run(*argv: str) -> None:
    merge_elements.main(list(argv))


def test_round_trip_is_pixel_exact_when_elements_already_have_box_size(tmp_path):
    originals = write_package(tmp_path / "packages" / "exact", KEY_ELEMENTS_512, noise)
    dataset = tmp_path / "dataset"
    run("--packages_dir", str(tmp_path / "packages"), "--layout", "key_elements", "--resolution", "512",
        "--output_dir", str(dataset))
    atlas = dataset / "images" / "exact.png"
    assert Image.open(atlas).size == (512, 512)

    run("--split", "--input", str(atlas), "--layout", "key_elements", "--output_dir", str(tmp_path / "split"),
        "--dataset_dir", str(dataset))
    for element in KEY_ELEMENTS_512.elements:
        back = np.asarray(Image.open(tmp_path / "split" / "exact" / element.split_name))
        assert np.array_equal(back[..., :3], np.asarray(originals[element.id])), element.id
        assert back[..., 3].min() == 255  # opaque sources come back opaque

    row = json.loads((dataset / "train.jsonl").read_text(encoding="utf-8"))
    assert row["image"] == "images/exact.png" and row["package"] == "exact" and row["layout"] == "key_elements"
    assert row["text"] == ""
    by_id = {p["id"]: p for p in row["elements"]}
    shift = by_id["key_shift"]
    assert (shift["box"], shift["source"], shift["fit"], shift["size"]) == ([88, 288, 168, 392], "key_shift.png", "nine_patch", [80, 104])
    assert shift["ninepatch"] is None and [layer["role"] for layer in shift["layers"]] == ["background"]
    assert json.loads((dataset / "layout.json").read_text())["width"] == 512


def test_round_trip_is_close_when_elements_were_resized(tmp_path):
    """Elements drawn at half their box size come back at their own (native) size, close to the originals."""
    layout = load_layout("key_elements", 1024)
    originals = write_package(tmp_path / "pkgs" / "atlas", layout, smooth, scale=0.5)
    dataset = tmp_path / "ds"
    run("--packages_dir", str(tmp_path / "pkgs"), "--layout", "key_elements", "--resolution", "1024",
        "--output_dir", str(dataset))
    run("--split", "--input", str(dataset / "images" / "atlas.png"), "--layout", "key_elements",
        "--output_dir", str(tmp_path / "out"), "--dataset_dir", str(dataset))
    for element in layout.elements:
        back = Image.open(tmp_path / "out" / "atlas" / element.split_name).convert("RGB")
        assert back.size == originals[element.id].size
        error = np.abs(np.asarray(back, np.float32) - np.asarray(originals[element.id], np.float32)).mean()
        assert error < 3.0, (element.id, error)


def test_ninepatch_element_keeps_its_corners_and_alpha_composites_over_the_background(tmp_path):
    layout = KEY_ELEMENTS_512
    write_package(tmp_path / "pkg", layout, noise, skip=("key_26_bg",))
    # A 20x20 9-patch key: opaque coded corners, a half-transparent white middle, 1-px stretch bands at 10.
    content = np.zeros((20, 20, 4), np.uint8)
    content[...] = (255, 255, 255, 128)
    content[:8, :8] = (200, 10, 10, 255)
    content[-8:, -8:] = (10, 10, 200, 255)
    border = np.zeros((22, 22, 4), np.uint8)
    border[1:-1, 1:-1] = content
    border[0, 11] = border[11, 0] = (0, 0, 0, 255)
    Image.fromarray(border, "RGBA").save(tmp_path / "pkg" / "key_26_bg.9.png")

    atlas, placements = merge_package(tmp_path / "pkg", layout)
    pixels = np.asarray(atlas).astype(int)
    x0, y0, x1, y1 = next(e.box for e in layout.elements if e.id == "key_26_bg")
    assert next(p for p in placements if p["id"] == "key_26_bg")["source"] == "key_26_bg.9.png"
    assert (pixels[y0 : y0 + 8, x0 : x0 + 8] == (200, 10, 10)).all()
    assert (pixels[y1 - 8 : y1, x1 - 8 : x1] == (10, 10, 200)).all()
    # Only the 1-px band stretched: a plain resize of the 20-px key to 72x104 would paint red up to ~28 px in.
    # The half-transparent middle shows the skin's keyboard background (the layout's backdrop) through it.
    backdrop = Image.open(tmp_path / "pkg" / "keyboard_bg.png").convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
    expected = np.asarray(backdrop, float)[12, 12] * (127 / 255) + 255 * (128 / 255)
    assert np.abs(pixels[y0 + 12, x0 + 12] - expected).max() <= 1
    dark = load_layout("four_parts", 512)
    four = tmp_path / "four"
    four.mkdir()
    Image.new("RGB", (64, 64), (0, 0, 0)).save(four / "keyboard_bg.png")
    Image.new("RGBA", (64, 64), (255, 255, 255, 128)).save(four / "part_letters.png")
    Image.new("RGBA", (64, 64), (0, 0, 255, 255)).save(four / "part_function.png")
    Image.new("RGBA", (64, 64), (0, 255, 0, 0)).save(four / "bar_candidate.png")
    atlas, _ = merge_package(four, dark)
    assert tuple(atlas.getpixel((256, 150))) == (128, 128, 128)  # white at alpha 128 over black
    assert tuple(atlas.getpixel((256, 300))) == (0, 0, 255)  # function row drawn above the background
    assert tuple(atlas.getpixel((256, 20))) == (0, 0, 0)  # a fully transparent bar leaves the background


def zip_package(path, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_zip_package_with_a_top_folder_merges_like_the_folder(tmp_path):
    images = write_package(tmp_path / "folder", KEY_ELEMENTS_512, noise)
    entries = {f"inner/{e.split_name}": png_bytes(images[e.id]) for e in KEY_ELEMENTS_512.elements}
    entries["__MACOSX/inner/._key_shift.png"] = b"junk"
    zip_package(tmp_path / "zipped.zip", entries)
    from_folder, _ = merge_package(tmp_path / "folder", KEY_ELEMENTS_512)
    from_zip, placements = merge_package(tmp_path / "zipped.zip", KEY_ELEMENTS_512)
    assert np.array_equal(np.asarray(from_folder), np.asarray(from_zip))
    assert next(p for p in placements if p["id"] == "key_shift")["source"] == "inner/key_shift.png"


@pytest.mark.parametrize("bad_name", ["../evil.png", "/etc/evil.png", "a/../../evil.png"])
def test_zip_slip_entry_is_rejected_with_the_entry_named(tmp_path, bad_name):
    zip_package(tmp_path / "evil.zip", {"key_shift.png": png_bytes(noise((8, 8), 0)), bad_name: b"x"})
    with pytest.raises(SkingenError) as err:
        merge_package(tmp_path / "evil.zip", KEY_ELEMENTS_512)
    assert "unsafe zip entry" in str(err.value) and bad_name in str(err.value) and "evil.zip" in str(err.value)


def test_missing_element_message_lists_it_with_the_patterns_tried(tmp_path):
    write_package(tmp_path / "pkgs" / "partial", KEY_ELEMENTS_512, noise, skip=("key_enter", "key_emoji"))
    with pytest.raises(SkingenError) as err:
        run("--packages_dir", str(tmp_path / "pkgs"), "--output_dir", str(tmp_path / "ds"))
    message = str(err.value)
    assert "partial" in message and "key_enter (tried key_enter*.png, btn_enter*.png" in message
    assert "key_emoji" not in message  # optional: its box just stays empty
    assert "--skip_incomplete" in message


def test_corrupt_png_message_names_package_and_file(tmp_path):
    write_package(tmp_path / "pkgs" / "broken", KEY_ELEMENTS_512, noise)
    data = (tmp_path / "pkgs" / "broken" / "key_space.png").read_bytes()
    (tmp_path / "pkgs" / "broken" / "key_space.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(SkingenError, match=r"broken: 'key_space.png' is not a readable image"):
        run("--packages_dir", str(tmp_path / "pkgs"), "--output_dir", str(tmp_path / "ds"))
    assert not list((tmp_path / "ds" / "images").iterdir())


def test_skip_incomplete_reports_and_merges_the_rest(tmp_path, capsys):
    pkgs = tmp_path / "pkgs"
    write_package(pkgs / "a_good", KEY_ELEMENTS_512, noise)
    write_package(pkgs / "b_partial", KEY_ELEMENTS_512, noise, skip=("key_space",))
    write_package(pkgs / "c_good", KEY_ELEMENTS_512, noise)
    (pkgs / "c_good" / "notes.txt").write_text("not an element")
    dataset = tmp_path / "ds"
    run("--packages_dir", str(pkgs), "--output_dir", str(dataset), "--skip_incomplete", "--verbose")
    out = capsys.readouterr().out
    assert "skipped 1" in out and "skipped b_partial:" in out and "key_space" in out
    assert "c_good: files no element of 'key_elements' uses: notes.txt" in out
    rows = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines()]
    assert [r["package"] for r in rows] == ["a_good", "c_good"]
    assert sorted(p.name for p in (dataset / "images").iterdir()) == ["a_good.png", "c_good.png"]
    report = json.loads((dataset / "merge_report.json").read_text())
    assert list(report["skipped"]) == ["b_partial"] and report["unused_files"]["c_good"] == ["notes.txt"]


def test_rerun_skips_finished_packages_and_keeps_other_rows_and_fields(tmp_path, capsys):
    pkgs = tmp_path / "pkgs"
    write_package(pkgs / "a", KEY_ELEMENTS_512, noise)
    dataset = tmp_path / "ds"
    run("--packages_dir", str(pkgs), "--output_dir", str(dataset))
    image_a = dataset / "images" / "a.png"
    stamp = image_a.stat().st_mtime_ns
    # A later stage filled fields of a's row; a row of a package merged from elsewhere is there too.
    row_a = json.loads((dataset / "train.jsonl").read_text())
    row_a.update(text="a keyboard skin, iflyskin", conditioning_image="conditioning_images/a.png")
    other = {"image": "images/z.png", "package": "z", "layout": "key_elements", "elements": [], "text": "kept"}
    (dataset / "train.jsonl").write_text(json.dumps(row_a) + "\n" + json.dumps(other) + "\n")
    write_package(pkgs / "b", KEY_ELEMENTS_512, noise)
    capsys.readouterr()

    run("--packages_dir", str(pkgs), "--output_dir", str(dataset))
    assert "1 already merged, 1 to merge" in capsys.readouterr().out
    assert image_a.stat().st_mtime_ns == stamp
    rows = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines()]
    assert [r["package"] for r in rows] == ["a", "z", "b"]
    assert rows[0]["text"] == "a keyboard skin, iflyskin" and rows[0]["conditioning_image"] == "conditioning_images/a.png"
    assert rows[1] == other

    with pytest.raises(SkingenError, match="layout.json: this dataset was merged with layout 'key_elements' at 512x512"):
        run("--packages_dir", str(pkgs), "--output_dir", str(dataset), "--resolution", "1024")


def test_interrupted_run_leaves_no_partial_files_and_a_rerun_finishes(tmp_path):
    pkgs = tmp_path / "pkgs"
    for name in ("a", "c"):
        write_package(pkgs / name, KEY_ELEMENTS_512, noise)
    write_package(pkgs / "b", KEY_ELEMENTS_512, noise)
    (pkgs / "b" / "key_delete.png").write_bytes(b"\x89PNG not really")
    dataset = tmp_path / "ds"
    with pytest.raises(SkingenError, match="key_delete.png"):
        run("--packages_dir", str(pkgs), "--output_dir", str(dataset))
    # The run stopped at b: a's image and row are saved, nothing of b or c exists.
    assert sorted(p.name for p in (dataset / "images").iterdir()) == ["a.png"]
    assert [json.loads(line)["package"] for line in (dataset / "train.jsonl").read_text().splitlines()] == ["a"]

    # A killed run also leaves temp files beside the outputs and an image whose row was never saved.
    (dataset / "images" / ".c.png.x1y2.tmp").write_bytes(b"half an image")
    (dataset / ".train.jsonl.x1y2.tmp").write_text('{"image": "images/')
    Image.new("RGB", (512, 512)).save(dataset / "images" / "c.png")
    (pkgs / "b" / "key_delete.png").unlink()
    Image.new("RGB", (80, 104), (1, 2, 3)).save(pkgs / "b" / "key_delete.png")

    run("--packages_dir", str(pkgs), "--output_dir", str(dataset))
    assert sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file()) == [
        "images/a.png", "images/b.png", "images/c.png", "layout.json", "masks/a.png", "masks/b.png", "masks/c.png",
        "merge_report.json", "train.jsonl"]
    rows = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines()]
    assert [r["package"] for r in rows] == ["a", "b", "c"]
    # c was re-merged: its unlisted black placeholder was replaced by the real atlas.
    assert np.asarray(Image.open(dataset / "images" / "c.png")).max() > 0


def test_two_workers_give_the_same_dataset_as_one(tmp_path):
    pkgs = tmp_path / "pkgs"
    for i in range(4):
        write_package(pkgs / f"p{i}", KEY_ELEMENTS_512, lambda size, j, i=i: noise(size, 100 * i + j))
    run("--package", *(str(pkgs / f"p{i}") for i in range(4)), "--output_dir", str(tmp_path / "one"))
    run("--packages_dir", str(pkgs), "--output_dir", str(tmp_path / "two"), "--num_workers", "2")
    for name in ("train.jsonl", "images/p0.png", "images/p3.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_split_of_a_folder_resumes_and_checks_the_size(tmp_path, capsys):
    atlases = tmp_path / "atlases"
    atlases.mkdir()
    for name in ("g0", "g1"):
        noise((512, 320), 1).save(atlases / f"{name}.png")
    out = tmp_path / "packages"
    run("--split", "--input", str(atlases), "--layout", "four_parts", "--output_dir", str(out))
    assert sorted(p.name for p in (out / "g0").iterdir()) == sorted(
        [e.split_name for e in load_layout("four_parts").elements] + ["skin.yaml"])
    noise((1024, 640), 2).save(atlases / "g2.png")  # the 1024 variant is picked from the image size
    noise((600, 600), 2).save(atlases / "g3.png")
    capsys.readouterr()
    with pytest.raises(SkingenError, match=r"g3.png: image is 600x600 but layout 'four_parts' at 512 px is 512x320"):
        run("--split", "--input", str(atlases), "--layout", "four_parts", "--output_dir", str(out))
    assert Image.open(out / "g2" / "keyboard_bg.png").size == (1024, 640)
    assert not (out / "g3").exists()


def test_flag_mistakes_exit_with_usage(tmp_path):
    with pytest.raises(SystemExit):
        run("--output_dir", str(tmp_path))  # neither --packages_dir nor --package
    with pytest.raises(SystemExit):
        run("--split", "--output_dir", str(tmp_path))  # --split without --input
