"""inference.py on the tiny SD3 and FLUX pipelines at 64 px: the pipeline comes from model_index.json, with
flow-matching Euler, per-image seeds, the control image reaching the model, multi-ControlNets, resume, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import inference
from skingen.backbones import pipelines
from skingen.errors import SkingenError
from skingen.fileio import read_jsonl
from skingen.generate.pipeline import load_controlnet_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BACKBONES = ("sd3", "flux")


def control_image(index: int, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle([2 + 9 * index, 2, 60, 20], fill=(255, 255, 255))
    draw.rectangle([4, 30, 30 + 10 * index, 60], outline=(255, 255, 255), width=3)
    return image


@pytest.fixture(scope="module")
def flow_models(tiny_sd3_dir, tiny_flux_dir, tmp_path_factory):
    """Per backbone: the base folder and a ControlNet whose zero-initialised layers are re-drawn, as after
    training (a fresh ControlNet adds exactly nothing, so the control image could not matter)."""
    import diffusers

    models = {}
    for backbone, base in (("sd3", tiny_sd3_dir), ("flux", tiny_flux_dir)):
        family = pipelines.family_named(backbone)
        controlnet = getattr(diffusers, family.controlnet_model).from_pretrained(base / "controlnet")
        torch.manual_seed(0)
        with torch.no_grad():
            for param in controlnet.parameters():
                if param.abs().sum() == 0:
                    fan_in = param.shape[-1] if param.dim() > 1 else 1
                    param.normal_(0.0, 2.0 / fan_in**0.5)
        out = tmp_path_factory.mktemp(f"trained_{backbone}_controlnet")
        controlnet.save_pretrained(out)
        models[backbone] = (base, out)
    return models


@pytest.fixture(scope="module")
def controls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controls")
    paths = []
    for index in range(2):
        control_image(index).save(folder / f"{index}.png")
        paths.append(str(folder / f"{index}.png"))
    return paths


def run(base, controlnets, output_dir, *extra) -> None:
    inference.main([
        "--pretrained_model_name_or_path", str(base), "--controlnet", *map(str, controlnets),
        "--output_dir", str(output_dir), "--num_inference_steps", "2", "--device", "cpu", *map(str, extra),
    ])  # fmt: skip


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_generates_with_the_family_pipeline_seeded_per_image(backbone, flow_models, controls, tmp_path):
    base, controlnet = flow_models[backbone]
    prompts = ["--prompt", "a keyboard skin, iflyskin", "--control_image", *controls, "--num_images_per_prompt", "2"]
    run(base, [controlnet], tmp_path / "batched", *prompts, "--batch_size", "4")
    records = [record for _, record in read_jsonl(tmp_path / "batched" / "results.jsonl")]
    assert [r["seed"] for r in records] == [0, 1, 2, 3]
    settings = records[0]["settings"]
    family = pipelines.family_named(backbone)
    assert settings["scheduler"] == "flow_euler" and settings["guidance_scale"] == family.default_guidance_scale
    assert (tmp_path / "batched" / "grids" / "0000.png").is_file()

    # One image per call gives the same pixels (up to float rounding in batched kernels): each image's noise,
    # and its control latent, depend only on its seed and control image.
    run(base, [controlnet], tmp_path / "single", *prompts, "--batch_size", "1")
    for record in records:
        difference = pixels(tmp_path / "batched" / record["output"]) - pixels(tmp_path / "single" / record["output"])
        assert np.abs(difference).max() <= 1, record["output"]
    outputs = {r["output"]: pixels(tmp_path / "batched" / r["output"]) for r in records}
    # Seeds differ -> images differ; control images differ (same prompt) -> images differ.
    assert np.abs(outputs["images/0000_s0.png"] - outputs["images/0000_s1.png"]).mean() > 0.5
    assert np.abs(outputs["images/0000_s0.png"] - outputs["images/0001_s2.png"]).mean() > 0.5

    # A rerun resumes: nothing left to generate.
    before = (tmp_path / "batched" / "images" / "0000_s0.png").stat().st_mtime_ns
    run(base, [controlnet], tmp_path / "batched", *prompts, "--batch_size", "4")
    assert (tmp_path / "batched" / "images" / "0000_s0.png").stat().st_mtime_ns == before


@pytest.mark.parametrize("backbone", BACKBONES)
def test_several_controlnets_make_the_family_multi_controlnet(backbone, flow_models, controls, tmp_path):
    base, controlnet = flow_models[backbone]
    pipeline = load_controlnet_pipeline(base, [controlnet, controlnet], device="cpu")
    assert type(pipeline).__name__ == pipelines.family_named(backbone).controlnet_pipeline
    assert type(pipeline.controlnet).__name__ == pipelines.family_named(backbone).multi_controlnet_model
    # Both nets see their own control image; a zero scale on the second gives the single-ControlNet image.
    run(base, [controlnet, controlnet], tmp_path / "multi", "--prompt", "a skin", "--control_image", controls[0],
        "--control_image", controls[1], "--controlnet_conditioning_scale", "1.0", "0.0")  # fmt: skip
    run(base, [controlnet], tmp_path / "one", "--prompt", "a skin", "--control_image", controls[0])
    multi, one = (
        pixels(tmp_path / "multi" / "images" / "0000_s0.png"),
        pixels(tmp_path / "one" / "images" / "0000_s0.png"),
    )
    assert np.abs(multi - one).max() <= 2


def test_errors_name_the_family(flow_models, tiny_sdxl_dir, controls, tmp_path):
    sd3, sd3_controlnet = flow_models["sd3"]
    flux, flux_controlnet = flow_models["flux"]
    prompt = ["--prompt", "a skin", "--control_image", controls[0]]
    with pytest.raises(
        SkingenError, match=r"a ControlNetModel, but the base model .* is SD3, which needs a SD3ControlNetModel"
    ):
        run(sd3, [tiny_sdxl_dir / "controlnet"], tmp_path / "a", *prompt)
    with pytest.raises(SkingenError, match=r"a FluxControlNetModel, but the base model .* is SDXL"):
        run(tiny_sdxl_dir, [flux_controlnet], tmp_path / "b", *prompt)
    with pytest.raises(SkingenError, match="--scheduler unipc: not a sampler for FLUX.1"):
        run(flux, [flux_controlnet], tmp_path / "c", *prompt, "--scheduler", "unipc")
    with pytest.raises(SkingenError, match="--negative_prompt: FLUX.1"):
        run(flux, [flux_controlnet], tmp_path / "d", *prompt, "--negative_prompt", "blurry")
    with pytest.raises(SkingenError, match="--height 72: must be a positive multiple of 16"):
        run(sd3, [sd3_controlnet], tmp_path / "e", *prompt, "--height", "72", "--width", "64")
    with pytest.raises(SkingenError, match="no model_index.json"):
        run(tmp_path, [sd3_controlnet], tmp_path / "f", *prompt)
    # A ControlNet made for another base (here: another text-encoder width) fails before its weights load.
    other = tmp_path / "other_controlnet"
    shutil.copytree(sd3_controlnet, other)
    config = json.loads((other / "config.json").read_text())
    config["joint_attention_dim"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    (other / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(SkingenError, match="joint_attention_dim: ControlNet 128 vs base 64"):
        run(sd3, [other], tmp_path / "g", *prompt)
    assert not any((tmp_path / name / "results.jsonl").exists() for name in "abcdefg")
