"""Layout specs: the shipped ones, resolution scaling, the template, fit modes and spec errors."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from skingen.errors import SkingenError
from skingen.skins.atlas import fit_image
from skingen.skins.layout import Layout, available_layouts, load_layout, render_template

SHIPPED = ("key_elements", "four_parts", "full_keyboard")


def test_shipped_layouts_load_at_both_sizes_with_boxes_scaled_from_one_spec():
    assert set(SHIPPED) <= set(available_layouts())
    for name in SHIPPED:
        small, large = load_layout(name, 512), load_layout(name, 1024)
        assert small.width == 512 and large.size == (1024, 2 * small.height)
        assert small.height % 8 == 0  # latent-friendly at both sizes
        assert [e.id for e in small.elements] == [e.id for e in large.elements]
        for a, b in zip(small.elements, large.elements):
            assert tuple(2 * v for v in a.box) == b.box
            x0, y0, x1, y1 = b.box
            assert 0 <= x0 < x1 <= 1024 and 0 <= y0 < y1 <= large.height
            # What --split writes must be found again by the element's own patterns.
            assert b.split_name and any(fnmatch.fnmatch(b.split_name, p) for p in b.patterns)
    assert load_layout("key_elements").resolution == 512  # the first listed size is the default
    # Whole keyboards keep a phone keyboard's shape (1.6:1) instead of being squashed into a square.
    assert load_layout("full_keyboard", 1024).size == load_layout("four_parts", 1024).size == (1024, 640)


def test_key_elements_tiles_do_not_overlap_so_split_returns_each_element():
    layout = load_layout("key_elements", 1024)
    ids = {e.id for e in layout.elements}
    assert {"candidate_bar", "keyboard_bg", "key_9_bg", "key_26_bg", "key_shift", "key_delete", "key_enter",
            "key_space", "key_num", "key_emoji", "key_comma", "key_period", "key_switch_lang"} <= ids
    covered = np.zeros((1024, 1024), np.int32)
    for e in layout.elements:
        x0, y0, x1, y1 = e.box
        covered[y0:y1, x0:x1] += 1
    assert covered.max() == 1


def test_template_outlines_every_box_white_on_black():
    layout = load_layout("key_elements", 512)
    template = render_template(layout, line_width=2)
    assert template.mode == "RGB" and template.size == (512, 512)
    pixels = np.asarray(template)
    assert set(np.unique(pixels)) == {0, 255}
    for e in layout.elements:
        x0, y0, x1, y1 = e.box
        assert tuple(pixels[y0, x0]) == (255, 255, 255)
        assert tuple(pixels[y1 - 1, x1 - 1]) == (255, 255, 255)
        assert tuple(pixels[y0 + 1, (x0 + x1) // 2]) == (255, 255, 255)  # 2-px line
        assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == (0, 0, 0)  # inside is empty
    # Between the candidate bar (ends at y=64) and the next row (starts at y=72): nothing drawn.
    assert pixels[66:70].max() == 0


def test_fit_modes_fill_the_box_as_named():
    wide = Image.new("RGBA", (40, 20), (255, 0, 0, 255))
    contain = np.asarray(fit_image(wide, "contain", (20, 20)))
    assert contain.shape == (20, 20, 4)
    assert contain[10, 10, 3] == 255 and contain[0, 10, 3] == 0 and contain[-1, 10, 3] == 0  # letterboxed
    assert contain[5:15, :, 3].min() == 255
    cover = np.asarray(fit_image(wide, "cover", (20, 20)))
    assert cover[..., 3].min() == 255  # fills the whole box
    halves = Image.new("RGBA", (40, 20), (255, 0, 0, 255))
    halves.paste((0, 0, 255, 255), (20, 0, 40, 20))
    cover = np.asarray(fit_image(halves, "cover", (10, 20)))  # keeps the centre columns 10..30
    assert tuple(cover[10, 0]) == (255, 0, 0, 255) and tuple(cover[10, -1]) == (0, 0, 255, 255)
    stretched = fit_image(wide, "stretch", (20, 20))
    assert np.asarray(stretched)[..., 3].min() == 255
    same = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA")
    for fit in ("stretch", "contain", "cover", "nine_patch"):
        assert np.array_equal(np.asarray(fit_image(same, fit, (8, 8))), np.asarray(same))


def write_spec(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD_ELEMENT = """  - id: bar
    box: [0, 0, 100, 20]
    patterns: ["bar*.png"]
    split_name: bar.png
"""


def spec(elements: str, head: str = "name: t\ncanvas: [100, 100]\nresolutions: [100, 200]\n") -> str:
    return head + "elements:\n" + elements


def test_fraction_boxes_and_a_path_spec_load(tmp_path):
    path = write_spec(tmp_path, spec(
        "  - id: half\n    box: [0, 0.5, 1, 1]\n    patterns: [\"h*.png\"]\n",
        head="name: frac\ncanvas: [100, 80]\nunits: fraction\nresolutions: [100, 200]\nbackground: '#102030'\n",
    ))
    layout = load_layout(path, resolution=200)
    assert layout.size == (200, 160) and layout.background == (16, 32, 48)
    assert layout.elements[0].box == (0, 80, 200, 160)
    assert layout.to_dict()["elements"][0]["box"] == [0, 80, 200, 160]


@pytest.mark.parametrize(
    ("elements", "expected"),
    [
        (GOOD_ELEMENT.replace("patterns", "fit: squash\n    patterns"), r"element 'bar': unknown fit 'squash'"),
        (GOOD_ELEMENT + GOOD_ELEMENT.replace("bar.png", "bar2.png"), r"element id 'bar' is used twice"),
        (GOOD_ELEMENT.replace("[0, 0, 100, 20]", "[0, 90, 100, 120]"), r"element 'bar': box \[0, 90, 100, 120\] .* outside the 100x100 canvas"),
        (GOOD_ELEMENT.replace("[0, 0, 100, 20]", "[50, 0, 10, 20]"), r"element 'bar': box .* empty"),
        (GOOD_ELEMENT.replace("bar.png\n", "other.png\n"), r"element 'bar': split_name 'other.png' matches none of its patterns"),
        (GOOD_ELEMENT.replace('["bar*.png"]', "[]"), r"element 'bar': 'patterns' must be a non-empty list"),
        (GOOD_ELEMENT.replace("    split_name", "    colour: red\n    split_name"), r"element 'bar': unknown key\(s\) \['colour'\]"),
        ("  - box: [0, 0, 10, 10]\n    patterns: [\"a*.png\"]\n", r"element #1: missing 'id'"),
    ],
)
def test_spec_errors_name_file_and_element(tmp_path, elements, expected):
    path = write_spec(tmp_path, spec(elements))
    with pytest.raises(SkingenError, match=expected) as err:
        load_layout(path)
    assert str(path) in str(err.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write_spec(tmp_path, "name: t\ncanvas: [100, 100]\nelements:\n  - id: a\n    box: [0, 0, 10\n")
    with pytest.raises(SkingenError, match=rf"{path}:\d+: invalid YAML"):
        load_layout(path)


def test_unknown_resolution_and_unknown_name_list_the_choices():
    with pytest.raises(SkingenError, match=r"no 768 px variant; use one of \[512, 1024\]"):
        load_layout("key_elements", 768)
    with pytest.raises(SkingenError, match="available: .*key_elements"):
        load_layout("no_such_layout")


def test_a_layout_record_loads_back_as_the_layout_it_records(tmp_path):
    """merge_elements.py writes Layout.to_dict() to a dataset's layout.json; later stages load it back."""
    for name in SHIPPED:
        for resolution in (512, 1024):
            layout = load_layout(name, resolution)
            assert Layout.from_dict(layout.to_dict()) == layout
    fraction_spec = write_spec(tmp_path, spec(
        "  - id: half\n    box: [0, 0.5, 1, 1]\n    patterns: [\"h*.png\"]\n",
        head="name: frac\ncanvas: [100, 80]\nunits: fraction\nresolutions: [100, 200]\n",
    ))
    layout = load_layout(fraction_spec, resolution=200)
    record = tmp_path / "layout.json"
    record.write_text(json.dumps(layout.to_dict()), encoding="utf-8")
    loaded = load_layout(record)
    assert loaded.path == str(record) and replace(loaded, path=layout.path) == layout
    assert load_layout(record, resolution=200) == loaded
    # The record holds boxes at one size only; another size must come from the spec.
    with pytest.raises(SkingenError, match=r"layout.json: this record holds layout 'frac' at 200 px only;.*--layout frac"):
        load_layout(record, resolution=100)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("elements"), r"not a layout record \(missing \['elements'\]\)"),
        (lambda d: d.update(canvas_size=1), r"not a layout record \(unknown key\(s\) \['canvas_size'\]\)"),
        (
            lambda d: d["elements"][0].update(box=[0, 0, 2000, 10]),
            r"element 'candidate_bar': box \[0, 0, 2000, 10\] .* outside the 1024x1024 canvas",
        ),
        (lambda d: d.update(resolution=512), r"'resolution' 512 must equal 'width' \(1024\)"),
        (lambda d: d["elements"][1].update(id="candidate_bar"), r"element id 'candidate_bar' is used twice"),
    ],
)
def test_a_broken_layout_record_names_the_file_and_what_is_wrong(tmp_path, change, expected):
    data = load_layout("key_elements", 1024).to_dict()
    change(data)
    record = tmp_path / "layout.json"
    record.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SkingenError, match=expected) as err:
        load_layout(record)
    assert str(record) in str(err.value)
    record.write_text("{broken", encoding="utf-8")
    with pytest.raises(SkingenError, match=r"layout.json:\d+: invalid JSON"):
        load_layout(record)
