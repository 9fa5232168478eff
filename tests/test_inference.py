"""inference.py on the tiny SDXL pipeline at 64 px: seeds, batching, resume, pairing, packages, MultiControlNet, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import inference
from skingen.errors import SkingenError
from skingen.fileio import read_jsonl
from skingen.generate import pipeline as generate_pipeline
from skingen.generate.jobs import pair_prompts_and_controls
from skingen.generate.pipeline import load_controlnet_pipeline

SIZE = 64
STEPS = "2"
GENERATE_BATCH = generate_pipeline.generate_batch  # the real one, whatever a test patches in
LAYOUT_YAML = """
name: test_two_tiles
canvas: [64, 64]
resolutions: [64]
background: [255, 255, 255]
elements:
  - {id: candidate_bar, box: [0, 0, 64, 16], patterns: ["bar_candidate*.png"], split_name: bar_candidate.png}
  - {id: keyboard_bg, box: [0, 16, 64, 64], patterns: ["keyboard_bg*.png"], split_name: keyboard_bg.png}
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def control_image(index: int) -> Image.Image:
    """A template-like control: white outlines on black, different per index."""
    image = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle([2 + 3 * index, 2, 60, 14], outline=(255, 255, 255), width=2)
    draw.rectangle([4, 20 + 4 * index, 40, 60], outline=(255, 255, 255), width=2)
    return image


@pytest.fixture(scope="module")
def controlnet_dir(tiny_sdxl_dir, tmp_path_factory):
    """The tiny ControlNet with its convolutions re-drawn at a gain that carries the control image through, as
    after training: a fresh ControlNet's zero convolutions add exactly nothing, so the control could not matter."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(tiny_sdxl_dir / "controlnet")
    embedding_convs = [m for m in controlnet.controlnet_cond_embedding.modules() if isinstance(m, torch.nn.Conv2d)]
    torch.manual_seed(0)
    with torch.no_grad():
        for conv in [*embedding_convs, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 3.0 / conv.weight[0].numel() ** 0.5)
            conv.bias.normal_(0.0, 0.1)
    out = tmp_path_factory.mktemp("trained_controlnet")
    controlnet.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """Three held-out rows (validation.jsonl) with 64 px controls and 128 px target images, one with a text box."""
    folder = tmp_path_factory.mktemp("dataset")
    (folder / "images").mkdir()
    (folder / "conditioning_images").mkdir()
    rows = []
    for index in range(3):
        control_image(index).save(folder / "conditioning_images" / f"{index}.png")
        Image.new("RGB", (2 * SIZE, 2 * SIZE), (40 * index, 90, 160)).save(folder / "images" / f"{index}.png")
        row = {
            "text": f'a keyboard skin number {index}, iflyskin, writing "前往"',
            "image": f"images/{index}.png",
            "conditioning_image": f"conditioning_images/{index}.png",
        }
        if index == 0:
            row["box"] = [[[20, 8], [100, 8], [100, 40], [20, 40]]]  # in the 128 px target image's pixels
        rows.append(row)
    (folder / "validation.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return folder


def base_args(tiny_sdxl_dir, controlnet_dir, output_dir) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny_sdxl_dir),
        "--controlnet", str(controlnet_dir),
        "--output_dir", str(output_dir),
        "--num_inference_steps", STEPS,
        "--device", "cpu",
    ]  # fmt: skip


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def records(output_dir) -> list[dict]:
    return [record for _, record in read_jsonl(output_dir / "results.jsonl")]


def count_batches(monkeypatch, fail_on_call: int | None = None) -> list[int]:
    """Count pipeline calls (sizes); optionally stop with KeyboardInterrupt at call ``fail_on_call``, like Ctrl-C."""
    calls: list[int] = []

    def counted(pipeline, jobs, settings):
        if fail_on_call is not None and len(calls) + 1 == fail_on_call:
            raise KeyboardInterrupt
        calls.append(len(jobs))
        return GENERATE_BATCH(pipeline, jobs, settings)

    monkeypatch.setattr(generate_pipeline, "generate_batch", counted)
    return calls


@pytest.fixture(scope="module")
def reference_run(tiny_sdxl_dir, controlnet_dir, dataset_dir, tmp_path_factory):
    """The dataset generated one image per call with two images per prompt."""
    out = tmp_path_factory.mktemp("reference")
    inference.main(
        base_args(tiny_sdxl_dir, controlnet_dir, out)
        + ["--dataset_dir", str(dataset_dir), "--num_images_per_prompt", "2", "--batch_size", "1", "--seed", "7"]
    )
    return out


def test_every_image_is_listed_with_the_keys_evaluate_reads(reference_run, dataset_dir):
    rows = records(reference_run)
    assert len(rows) == 6  # 3 validation rows x 2 images
    assert [row["seed"] for row in rows] == [7, 8, 9, 10, 11, 12]  # seed + row * 2 + k: no two images share noise
    for row in rows:
        generated = Image.open(reference_run / row["output"])
        assert generated.size == (SIZE, SIZE)  # default size: the control image's
        assert row["output"].endswith(f"_s{row['seed']}.png")
        assert Image.open(row["conditioning_image"]).size == (SIZE, SIZE)
        assert row["prompt"].startswith("a keyboard skin number")
        assert row["settings"]["scheduler"] == "unipc"
    first = rows[0]
    assert first["row_id"] == "images/0.png"
    assert first["texts"] == ["前往"]  # from writing "..." in the caption
    # Boxes were measured on the 128 px target image; results give them in the 64 px output's pixels.
    assert first["box"] == [[[10.0, 4.0], [50.0, 4.0], [50.0, 20.0], [10.0, 20.0]]]
    assert first["box_size"] == [SIZE, SIZE]
    assert "box" not in rows[2]
    # One grid per prompt: its control image, then its two images.
    grid = Image.open(reference_run / first["grid"])
    assert grid.size == (3 * SIZE, SIZE)
    assert np.array_equal(np.asarray(grid)[:, :SIZE], np.asarray(control_image(0)))
    assert np.array_equal(np.asarray(grid, dtype=np.int16)[:, SIZE : 2 * SIZE], pixels(reference_run / first["output"]))
    assert len(list((reference_run / "grids").glob("*.png"))) == 3


def test_same_seed_gives_same_image_across_runs_and_batch_sizes(
    reference_run, tiny_sdxl_dir, controlnet_dir, dataset_dir, tmp_path
):
    out = tmp_path / "batched"
    inference.main(
        base_args(tiny_sdxl_dir, controlnet_dir, out)
        + ["--dataset_dir", str(dataset_dir), "--num_images_per_prompt", "2", "--batch_size", "4", "--seed", "7"]
    )
    reference = {row["output"]: pixels(reference_run / row["output"]) for row in records(reference_run)}
    batched = {row["output"]: pixels(out / row["output"]) for row in records(out)}
    assert batched.keys() == reference.keys()
    for name in reference:
        # Batched matrix products may round differently in the last bit: allow one grey level.
        assert np.abs(batched[name] - reference[name]).max() <= 1, name
    # Different seeds and rows do give different images.
    images = list(reference.values())
    assert np.abs(images[0] - images[1]).mean() > 5
    assert np.abs(images[0] - images[2]).mean() > 5

    again = tmp_path / "again"
    inference.main(
        base_args(tiny_sdxl_dir, controlnet_dir, again)
        + ["--dataset_dir", str(dataset_dir), "--num_images_per_prompt", "2", "--batch_size", "1", "--seed", "7"]
    )
    for row in records(again):
        assert np.array_equal(pixels(again / row["output"]), reference[row["output"]])


def test_rerun_generates_nothing_and_interrupted_run_finishes_the_rest(
    reference_run, tiny_sdxl_dir, controlnet_dir, dataset_dir, tmp_path, monkeypatch
):
    args = base_args(tiny_sdxl_dir, controlnet_dir, tmp_path / "run") + [
        "--dataset_dir", str(dataset_dir), "--num_images_per_prompt", "2", "--batch_size", "1", "--seed", "7",
    ]  # fmt: skip
    count_batches(monkeypatch, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        inference.main(args)
    assert len(records(tmp_path / "run")) == 2  # the two finished images are kept and listed

    calls = count_batches(monkeypatch)
    inference.main(args)
    assert calls == [1, 1, 1, 1]  # only the four missing images
    finished = {row["output"]: pixels(tmp_path / "run" / row["output"]) for row in records(tmp_path / "run")}
    reference = {row["output"]: pixels(reference_run / row["output"]) for row in records(reference_run)}
    assert finished.keys() == reference.keys()
    assert all(np.array_equal(finished[name], reference[name]) for name in reference)

    calls = count_batches(monkeypatch)
    inference.main(args)
    assert calls == []

    # A deleted image is made again; the others are not.
    first = records(tmp_path / "run")[0]["output"]
    (tmp_path / "run" / first).unlink()
    inference.main(args)
    assert calls == [1]
    assert np.array_equal(pixels(tmp_path / "run" / first), reference[first])


def test_changed_settings_need_overwrite(
    reference_run, tiny_sdxl_dir, controlnet_dir, dataset_dir, tmp_path, monkeypatch
):
    args = base_args(tiny_sdxl_dir, controlnet_dir, tmp_path / "run") + [
        "--dataset_dir",
        str(dataset_dir),
        "--max_samples",
        "1",
    ]
    inference.main(args)
    with pytest.raises(SkingenError, match=r"--num_inference_steps 2, this run asks for 3.*--overwrite"):
        inference.main(args + ["--num_inference_steps", "3"])
    calls = count_batches(monkeypatch)
    inference.main(args + ["--num_inference_steps", "3", "--overwrite", "--batch_size", "1"])
    assert calls == [1]
    assert [row["settings"]["num_inference_steps"] for row in records(tmp_path / "run")] == [3]


def test_prompt_and_control_pairing_rules(tmp_path):
    for index in range(3):
        control_image(index).save(tmp_path / f"c{index}.png")
    c = [str(tmp_path / f"c{index}.png") for index in range(3)]

    one_prompt = pair_prompts_and_controls(["p"], [c])
    assert [(prompt, controls[0]) for prompt, controls in one_prompt] == [("p", c[0]), ("p", c[1]), ("p", c[2])]
    one_control = pair_prompts_and_controls(["a", "b"], [c[:1]])
    assert [(prompt, controls[0]) for prompt, controls in one_control] == [("a", c[0]), ("b", c[0])]
    pairs = pair_prompts_and_controls(["a", "b"], [c[:2]])
    assert [(prompt, controls[0]) for prompt, controls in pairs] == [("a", c[0]), ("b", c[1])]
    per_controlnet = pair_prompts_and_controls(["a", "b"], [c[:2], c[2:]])
    assert [controls for _, controls in per_controlnet] == [(c[0], c[2]), (c[1], c[2])]
    with pytest.raises(SkingenError, match="--prompt has 2.*group 1 has 3.*same number"):
        pair_prompts_and_controls(["a", "b"], [c])


def test_prompt_lists_generate_one_row_per_pair(tiny_sdxl_dir, controlnet_dir, tmp_path):
    control_image(0).save(tmp_path / "template.png")
    out = tmp_path / "out"
    inference.main(
        base_args(tiny_sdxl_dir, controlnet_dir, out)
        + [
            "--prompt",
            "a red skin",
            "a blue skin",
            "--control_image",
            str(tmp_path / "template.png"),
            "--resolution",
            "48",
        ]
    )
    rows = records(out)
    assert [(row["row_id"], row["prompt"], row["seed"]) for row in rows] == [
        ("0000", "a red skin", 0),
        ("0001", "a blue skin", 1),
    ]
    assert all(row["conditioning_image"] == str(tmp_path / "template.png") for row in rows)
    assert all(Image.open(out / row["output"]).size == (48, 48) for row in rows)

    args = base_args(tiny_sdxl_dir, controlnet_dir, tmp_path / "bad")
    with pytest.raises(SkingenError, match="cannot pair prompts"):
        inference.main(args + ["--prompt", "a", "b", "--control_image", str(tmp_path / "template.png"), str(tmp_path / "template.png"), str(tmp_path / "template.png")])  # fmt: skip
    with pytest.raises(SkingenError, match=r"missing\.png: control image not found"):
        inference.main(args + ["--prompt", "a", "--control_image", str(tmp_path / "missing.png")])


def test_control_image_changes_the_output(tiny_sdxl_dir, controlnet_dir, tmp_path):
    for index in (0, 2):
        control_image(index).save(tmp_path / f"c{index}.png")
    out = tmp_path / "out"
    inference.main(
        base_args(tiny_sdxl_dir, controlnet_dir, out)
        + ["--prompt", "a skin", "--control_image", str(tmp_path / "c0.png"), str(tmp_path / "c2.png"), "--seed", "3"]
    )
    first, second = records(out)
    assert first["seed"] != second["seed"]
    same_seed = tmp_path / "same_seed"
    inference.main(
        base_args(tiny_sdxl_dir, controlnet_dir, same_seed)
        + ["--prompt", "a skin", "--control_image", str(tmp_path / "c2.png"), "--seed", "3"]
    )
    # Same prompt and seed as the first image, other control image: the ControlNet's input matters.
    (only,) = records(same_seed)
    assert np.abs(pixels(same_seed / only["output"]) - pixels(out / first["output"])).mean() > 1


def test_multi_controlnet(tiny_sdxl_dir, controlnet_dir, tmp_path):
    for index in (0, 2):
        control_image(index).save(tmp_path / f"c{index}.png")
    c0, c2 = str(tmp_path / "c0.png"), str(tmp_path / "c2.png")
    single = tmp_path / "single"
    inference.main(base_args(tiny_sdxl_dir, controlnet_dir, single) + ["--prompt", "a skin", "--control_image", c0])
    multi_args = base_args(tiny_sdxl_dir, controlnet_dir, tmp_path) + [
        "--controlnet",
        str(controlnet_dir),
        str(controlnet_dir),
    ]
    multi_args += ["--prompt", "a skin", "--control_image", c0, "--control_image", c2]

    off = tmp_path / "second_off"
    inference.main(multi_args + ["--output_dir", str(off), "--controlnet_conditioning_scale", "1.0", "0.0"])
    on = tmp_path / "second_on"
    inference.main(multi_args + ["--output_dir", str(on), "--controlnet_conditioning_scale", "1.0", "1.0"])
    (single_row,), (off_row,), (on_row,) = records(single), records(off), records(on)
    assert on_row["conditioning_images"] == [c0, c2]
    assert on_row["settings"]["controlnet_conditioning_scale"] == [1.0, 1.0]
    # The second ControlNet at scale 0 adds nothing: same image as the first alone; at scale 1 it changes it.
    assert np.abs(pixels(off / off_row["output"]) - pixels(single / single_row["output"])).max() <= 1
    assert np.abs(pixels(on / on_row["output"]) - pixels(single / single_row["output"])).mean() > 1

    with pytest.raises(SkingenError, match="3 values for 2 ControlNet"):
        inference.main(
            multi_args + ["--output_dir", str(tmp_path / "bad"), "--controlnet_conditioning_scale", "1", "1", "1"]
        )


def test_split_elements_writes_a_skin_package_per_image(tiny_sdxl_dir, controlnet_dir, tmp_path):
    layout = tmp_path / "two_tiles.yaml"
    layout.write_text(LAYOUT_YAML, encoding="utf-8")
    control_image(1).save(tmp_path / "template.png")
    out = tmp_path / "out"
    args = base_args(tiny_sdxl_dir, controlnet_dir, out) + [
        "--prompt",
        "a skin",
        "--control_image",
        str(tmp_path / "template.png"),
    ]
    inference.main(args + ["--num_images_per_prompt", "2", "--split_elements", str(layout)])
    for row in records(out):
        package = out / row["package"]
        generated = Image.open(out / row["output"]).convert("RGB")
        assert sorted(p.name for p in package.iterdir()) == ["bar_candidate.png", "keyboard_bg.png", "skin.yaml"]
        bar = Image.open(package / "bar_candidate.png").convert("RGB")
        assert np.array_equal(np.asarray(bar), np.asarray(generated.crop((0, 0, 64, 16))))
        assert Image.open(package / "keyboard_bg.png").size == (64, 48)

    # A smaller output than the layout's variants (a 32 px model) is resized up: packages keep native sizes.
    small = tmp_path / "small"
    inference.main(
        args + ["--output_dir", str(small), "--resolution", "32", "--split_elements", str(layout)]
    )
    (row,) = records(small)
    assert Image.open(small / row["output"]).size == (32, 32)
    assert Image.open(small / row["package"] / "bar_candidate.png").size == (64, 16)

    with pytest.raises(SkingenError, match="another aspect ratio"):
        inference.main(
            args
            + ["--output_dir", str(tmp_path / "other"), "--height", "32", "--width", "64", "--split_elements", str(layout)]
        )


def test_user_errors_are_clear(tiny_sdxl_dir, controlnet_dir, dataset_dir, tmp_path):
    broken = tmp_path / "broken"
    (broken / "conditioning_images").mkdir(parents=True)
    control_image(0).save(broken / "conditioning_images" / "0.png")
    broken_rows = [
        {"text": "ok", "conditioning_image": "conditioning_images/0.png"},
        {"text": "gone", "conditioning_image": "conditioning_images/9.png"},
    ]
    (broken / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in broken_rows), encoding="utf-8")
    args = base_args(tiny_sdxl_dir, controlnet_dir, tmp_path / "out")
    with pytest.raises(
        SkingenError, match=r"validation\.jsonl:2: 'conditioning_image' file 'conditioning_images/9\.png'.*not found"
    ):
        inference.main(args + ["--dataset_dir", str(broken)])
    with pytest.raises(SkingenError, match="not a diffusers pipeline folder"):
        inference.main(args + ["--dataset_dir", str(dataset_dir), "--pretrained_model_name_or_path", str(tmp_path)])
    with pytest.raises(SkingenError, match="unknown scheduler"):
        load_controlnet_pipeline(tiny_sdxl_dir, [controlnet_dir], scheduler="plms")
    with pytest.raises(SkingenError, match="needs --device cuda"):
        load_controlnet_pipeline(
            tiny_sdxl_dir, [controlnet_dir], device="cpu", enable_model_cpu_offload=True
        )
    with pytest.raises(SkingenError, match="is the dataset folder"):
        inference.main(args + ["--dataset_dir", str(dataset_dir), "--output_dir", str(dataset_dir)])
    assert not (tmp_path / "out" / "results.jsonl").exists()
