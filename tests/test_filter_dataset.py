"""scripts/filter_dataset.py: misaligned, blank and duplicate skins are dropped; train.jsonl is never touched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from repo_scripts import load_script

from skingen.data.dataset import read_rows, write_rows
from skingen.errors import SkingenError
from skingen.fileio import atomic_write_json
from skingen.skins.layout import load_layout

filter_dataset = load_script("scripts/filter_dataset.py")

LAYOUT = load_layout("key_elements", resolution=512)


def merged_skin(seed: int, offset=(0, 0), scale: float = 1.0) -> Image.Image:
    """Every element of the layout as a coloured tile with an icon; ``offset``/``scale`` misplace the layers."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", LAYOUT.size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for element in LAYOUT.elements:
        x0, y0, x1, y1 = (round(v * scale) for v in element.box)
        x0, x1, y0, y1 = x0 + offset[0], x1 + offset[0], y0 + offset[1], y1 + offset[1]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.ellipse((cx - 8, cy - 8, cx + 8, cy + 8), fill=tuple(255 - c for c in colour))
    return image


@pytest.fixture()
def dataset(tmp_path) -> Path:
    folder = tmp_path / "keyboard"
    (folder / "images").mkdir(parents=True)
    noisy = np.asarray(merged_skin(0)).astype(int) + np.random.default_rng(1).integers(-3, 4, (512, 512, 3))
    images = {
        "good_0": merged_skin(0),
        "good_1": merged_skin(1),
        "good_2": merged_skin(2),
        "misaligned": merged_skin(3, offset=(23, 31), scale=0.9),
        "blank": Image.new("RGB", LAYOUT.size, (250, 240, 245)),
        "copy_of_good_0": merged_skin(0),
        "near_copy_of_good_1": Image.fromarray(
            np.clip(np.asarray(merged_skin(1)).astype(int) + 20, 0, 255).astype(np.uint8)
        ),
        "noisy_good_0": Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
    }
    rows = []
    for name, image in images.items():
        image.save(folder / "images" / f"{name}.png")
        rows.append(
            {"image": f"images/{name}.png", "package": name, "layout": "key_elements", "text": f"{name}, iflyskin"}
        )
    write_rows(folder, rows)
    return folder


def test_filter_keeps_aligned_distinct_skins_and_reports_why(dataset):
    original = (dataset / "train.jsonl").read_bytes()
    filter_dataset.main(["--dataset_dir", str(dataset), "--min_edge_f1", "0.5"])

    assert (dataset / "train.jsonl").read_bytes() == original
    kept = [json.loads(line) for line in (dataset / "train.filtered.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["package"] for row in kept] == ["good_0", "good_1", "good_2"]
    assert kept == [row for row in read_rows(dataset) if row["package"].startswith("good")]

    report = json.loads((dataset / "filter_report.json").read_text(encoding="utf-8"))
    by_name = {Path(r["image"]).stem: r for r in report["rows"]}
    assert by_name["misaligned"]["reasons"] == ["edges"]
    assert by_name["misaligned"]["edge_f1"] < 0.5 < min(by_name[f"good_{i}"]["edge_f1"] for i in range(3))
    assert by_name["blank"]["reasons"] == ["edges", "blank"]
    assert by_name["copy_of_good_0"]["duplicate_of"] == "images/good_0.png"
    assert by_name["near_copy_of_good_1"]["duplicate_of"] == "images/good_1.png"
    assert by_name["noisy_good_0"]["duplicate_of"] == "images/good_0.png"
    # Skins of one layout in other colours are not near duplicates of each other.
    assert by_name["good_2"]["nearest_hash_distance"] > 8 and by_name["good_2"]["duplicate_of"] is None
    assert report["summary"]["kept"] == 3 and report["summary"]["dropped_duplicate"] == 3

    markdown = (dataset / "filter_report.md").read_text(encoding="utf-8")
    assert "| 8 | 3 | 2 | 1 | 3 |" in markdown
    dropped_section = markdown.split("## Dropped rows")[1]
    assert "| 4 | images/misaligned.png |" in dropped_section and "| 2 | images/good_1.png |" not in dropped_section


def test_threshold_and_output_paths(dataset, tmp_path):
    out = tmp_path / "elsewhere" / "kept.jsonl"
    filter_dataset.main(
        [
            "--dataset_dir",
            str(dataset),
            "--min_edge_f1",
            "0",
            "--min_layout_recall",
            "0",
            "--max_hash_distance",
            "-1",
            "--output_jsonl",
            str(out),
            "--report_dir",
            str(tmp_path / "rep"),
        ]
    )
    kept = [json.loads(line)["package"] for line in out.read_text(encoding="utf-8").splitlines()]
    # Only the blank image and the exact copy go when edges and near duplicates are not checked.
    assert kept == ["good_0", "good_1", "good_2", "misaligned", "near_copy_of_good_1", "noisy_good_0"]
    assert (tmp_path / "rep" / "filter_report.md").is_file()
    assert not (dataset / "train.filtered.jsonl").exists()


def test_refuses_to_overwrite_the_input_and_needs_a_layout(dataset):
    with pytest.raises(SkingenError, match="never overwrites train.jsonl"):
        filter_dataset.main(["--dataset_dir", str(dataset), "--output_jsonl", str(dataset / "train.jsonl")])
    rows = read_rows(dataset)
    del rows[2]["layout"]
    write_rows(dataset, rows)
    with pytest.raises(SkingenError, match=r'train.jsonl row 3: no "layout" field; pass --layout'):
        filter_dataset.main(["--dataset_dir", str(dataset)])
    filter_dataset.main(["--dataset_dir", str(dataset), "--layout", "key_elements", "--min_edge_f1", "0.5"])
    assert len((dataset / "train.filtered.jsonl").read_text(encoding="utf-8").splitlines()) == 3


def test_images_at_another_size_are_compared_at_the_layout_size(tmp_path):
    folder = tmp_path / "big"
    (folder / "images").mkdir(parents=True)
    merged_skin(5).resize((1024, 1024), Image.Resampling.NEAREST).save(folder / "images" / "a.png")
    merged_skin(6).resize((700, 700), Image.Resampling.NEAREST).save(folder / "images" / "b.png")
    write_rows(
        folder,
        [{"image": "images/a.png", "layout": "key_elements"}, {"image": "images/b.png", "layout": "key_elements"}],
    )
    filter_dataset.main(["--dataset_dir", str(folder), "--min_edge_f1", "0.5"])
    report = json.loads((folder / "filter_report.json").read_text(encoding="utf-8"))
    assert [row["kept"] for row in report["rows"]] == [True, True]


def test_the_layout_merge_elements_recorded_is_used_for_every_row(dataset):
    rows = read_rows(dataset)
    for row in rows:
        del row["layout"]
    write_rows(dataset, rows)
    with pytest.raises(SkingenError, match=r'train.jsonl row 1: no "layout" field'):
        filter_dataset.main(["--dataset_dir", str(dataset)])
    atomic_write_json(dataset / "layout.json", LAYOUT.to_dict())
    filter_dataset.main(["--dataset_dir", str(dataset), "--min_edge_f1", "0.5"])
    kept = [json.loads(line)["package"] for line in (dataset / "train.filtered.jsonl").read_text().splitlines()]
    assert kept == ["good_0", "good_1", "good_2"]


def test_defaults_keep_aligned_skins_of_every_stock_layout_and_say_why_others_go(tmp_path):
    """Real-like skins (synthetic packages, Android themes) pass the defaults in every stock layout; the same
    atlases with their layers shifted by 3% of the canvas are dropped, with the reason spelled out."""
    from android_theme import write_themes

    import merge_elements

    load_script("scripts/make_synthetic_skins.py").make_synthetic_skins(tmp_path / "skins", 3, seed=7)
    write_themes(tmp_path / "android")
    runs = [("skins", layout, []) for layout in ("key_elements", "four_parts", "full_keyboard")]
    runs.append(("android", "key_elements", ["--element_map", "android"]))
    for source, layout, extra in runs:
        dataset = tmp_path / f"{source}_{layout}"
        merge_elements.main(["--packages_dir", str(tmp_path / source), "--layout", layout, "--output_dir", str(dataset), *extra])
        rows = read_rows(dataset)
        for row in rows[:2]:  # a misaligned copy: layers 3% off the layout's boxes
            image = Image.open(dataset / row["image"])
            shifted = Image.new("RGB", image.size, image.getpixel((0, 0)))
            shifted.paste(image, (round(image.width * 0.03), round(image.height * 0.03)))
            shifted.save(dataset / "images" / f"shifted_{row['package']}.png")
            rows.append({**row, "image": f"images/shifted_{row['package']}.png", "package": f"shifted_{row['package']}"})
        write_rows(dataset, rows)
        filter_dataset.main(["--dataset_dir", str(dataset)])
        report = json.loads((dataset / "filter_report.json").read_text(encoding="utf-8"))
        kept = {Path(r["image"]).stem: r["kept"] for r in report["rows"]}
        assert all(ok for name, ok in kept.items() if not name.startswith("shifted")), (source, layout, report["rows"])
        if layout != "full_keyboard":  # one box: no interior line to misalign
            dropped = [r for r in report["rows"] if not r["kept"]]
            assert len(dropped) == 2 and all("of the layout's lines have an edge" in r["why"][0] for r in dropped)
            assert "of the layout's lines have an edge" in (dataset / "filter_report.md").read_text(encoding="utf-8")
