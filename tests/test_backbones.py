"""SD3 and FLUX ControlNet training on tiny pipelines through the shared loop (SDXL's own runs: test_training.py).

Per backbone: a short run saves a ControlNet the diffusers class loads (with the text loss and a validation grid),
resume is bit-exact, 2 processes train like 1, the text loss's gradient reaches the ControlNet, a ControlNet of
another architecture is refused before anything is cached, diffusers' command lines parse; plus the
flow-matching math (noisy input, x0 estimate, 2x2 packing) against its definition.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from box_skins import write_box_skins
from launching import launch
from PIL import Image
from repo_scripts import load_script
from safetensors.torch import load_file

from skingen.errors import SkingenError, run_cli

WEIGHTS = "diffusion_pytorch_model.safetensors"
NUM_ROWS = 4
FAMILIES = ("sd3", "flux")
CONTROLNET_CLASS = {"sdxl": "ControlNetModel", "sd3": "SD3ControlNetModel", "flux": "FluxControlNetModel"}

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 rows of 80x64 skins with one text box each and short captions (T5 reads them whole)."""
    return write_box_skins(tmp_path_factory.mktemp("skins"), NUM_ROWS)


def _base(request, family: str) -> Path:
    return request.getfixturevalue(f"tiny_{family}_dir")


def _argv(base, dataset, out, *extra, family: str = "sd3") -> list[str]:
    """Flags of a short 64 px run; SD3/FLUX read 32 T5 tokens (the captions fit)."""
    sequence = [] if family == "sdxl" else ["--max_sequence_length", "32"]
    return ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(dataset), "--output_dir", str(out),
            "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--seed", "0", "--report_to", "none", *sequence, *map(str, extra)]


def _script(family: str):
    return load_script(f"train_controlnet_{family}.py")


def _train(family, argv, **kwargs):
    from skingen.train.loop import train

    script = _script(family)
    args = script.parse_args(argv)
    return train(args, **kwargs)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_short_run_with_text_and_edge_losses_saves_a_controlnet_the_diffusers_class_loads(request, family, dataset, tmp_path):
    import diffusers

    out = tmp_path / "run"
    logs = {}
    result = _train(family, _argv(_base(request, family), dataset, out, "--max_train_steps", 2,
                                  "--text_loss_weight", 0.01, "--text_loss_max_timestep", 1000,
                                  "--edge_loss_weight", 0.2, "--edge_loss_crop_size", 32,
                                  "--validation_prompt", "skin", "--validation_image",
                                  dataset / "conditioning_images" / "0.png", "--num_validation_images", 1,
                                  "--validation_inference_steps", 2),
                    on_step=lambda step, values: logs.update({step: values}))
    assert result.global_step == 2
    controlnet = getattr(diffusers, CONTROLNET_CLASS[family]).from_pretrained(out)
    # from_transformer starts the output projections at zero; training must have moved them.
    assert controlnet.controlnet_blocks[0].weight.abs().max().item() > 0
    assert Image.open(out / "validation" / "step-2.png").size == (64 * 2, 64)  # conditioning image + 1 sample
    # Every loss term is logged (the edge loss beside the text loss); the text loss read the box of every row.
    assert logs[2]["loss_diffusion"] > 0 and 0 < logs[2]["loss_edge"] <= 0.2
    assert logs[2]["loss"] == pytest.approx(logs[2]["loss_diffusion"] + logs[2]["loss_text"] + logs[2]["loss_edge"])
    assert logs[1]["boxes_used"] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_after_stop_matches_uninterrupted_run(request, family, dataset, tmp_path):
    base = _base(request, family)
    common = ["--max_train_steps", 3, "--proportion_empty_prompts", 0.5, "--weighting_scheme", "logit_normal",
              "--embeddings_cache_dir", tmp_path / "cache"]
    straight = tmp_path / "straight"
    _train(family, _argv(base, dataset, straight, *common))

    stopped = tmp_path / "stopped"
    with pytest.raises(SkingenError, match=r"NaN/inf for 1 steps in a row.*checkpoint-2"):
        _train(family, _argv(base, dataset, stopped, *common, "--checkpointing_steps", 2,
                             "--debug_inject_nan_at_step", 3, "--max_nonfinite_steps", 1))
    result = _train(family, _argv(base, dataset, stopped, *common, "--checkpointing_steps", 2,
                                  "--resume_from_checkpoint", "latest"))
    assert result.global_step == 3
    # The caches the first run filled (every caption, "" included, and every image) serve the later ones.
    assert result.cache_stats == {"text_embeddings_computed": 0, "text_embeddings_reused": NUM_ROWS + 1,
                                  "latents_computed": 0, "latents_reused": NUM_ROWS}
    assert _max_difference(_weights(stopped), _weights(straight)) < 1e-6
    assert _max_difference(_weights(stopped), _weights(stopped / "checkpoint-2" / "controlnet")) > 1e-5


def test_two_processes_match_one_process_with_same_global_batch(request, dataset, tmp_path):
    steps = ["--max_train_steps", 2, "--proportion_empty_prompts", 0.3]
    runs = []
    for family in FAMILIES:
        base = _base(request, family)
        _train(family, _argv(base, dataset, tmp_path / f"{family}-one", *steps))
        runs.append([f"train_controlnet_{family}.py",
                     _argv(base, dataset, tmp_path / f"{family}-two", *steps, "--train_batch_size", 1)])
    finished = launch(runs, tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for family in FAMILIES:
        a, b = _weights(tmp_path / f"{family}-two"), _weights(tmp_path / f"{family}-one")
        differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        # Same data and noise, gradients summed in another order: only float rounding (Adam magnifies it where
        # gradients are ~0); other data would move nearly every weight by ~lr.
        assert (differences > 1e-6).float().mean().item() < 1e-3, family
        assert (differences > 1e-5).float().mean().item() < 1e-4, family


@pytest.mark.parametrize("family", FAMILIES)
def test_text_loss_gradient_reaches_the_controlnet(request, family):
    from skingen.backbones import backbone_class
    from skingen.train.recognizer import load_recognizer
    from skingen.train.text_loss import TextLoss

    args = _script(family).parse_args(_argv(_base(request, family), "unused", "unused"))
    backbone = backbone_class(family)(args)
    controlnet = backbone.new_controlnet()
    generator = torch.Generator().manual_seed(0)
    shape = (2, backbone.latent_channels, 8, 8)
    batch = {**backbone.encode_prompts(['writing "前往"', 'writing "搜索"']),
             "pixel_values": torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1,
             "conditioning_pixel_values": torch.rand(2, 3, 64, 64, generator=generator),
             "noise": torch.randn(shape, generator=generator), "latent_noise": torch.randn(shape, generator=generator),
             "timesteps": torch.stack([backbone.fixed_timestep(100)] * 2),
             "boxes": [torch.tensor([[[8.0, 8], [56, 8], [56, 40], [8, 40]]])] * 2, "texts": [["前往"], ["搜索"]],
             "sample_seeds": [1, 2]}
    output = backbone.forward(batch, controlnet, torch.float32)
    loss, logs = TextLoss(load_recognizer(), weight=1.0)(batch=batch, output=output, backbone=backbone,
                                                        weight_dtype=torch.float32, step=0)
    assert logs["boxes_used"] == 2 and loss.item() > 0
    loss.backward()
    gradient = controlnet.controlnet_blocks[0].weight.grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().max().item() > 0


@pytest.mark.parametrize(("family", "controlnet", "message"), [
    ("sd3", "tiny_sdxl_dir/controlnet", "a ControlNetModel, but the base model .* is SD3, which needs a SD3ControlNetModel"),
    ("flux", "tiny_sd3_dir/controlnet", "a SD3ControlNetModel, but the base model .* is FLUX.1"),
    ("flux", "tiny_flux_dir/transformer", "holds a FluxTransformer2DModel .*, not a ControlNet"),
    ("sdxl", "tiny_sdxl_dir/unet", "holds a UNet2DConditionModel .*, not a ControlNet"),
    ("sd3", "tiny_sd3_dir", "no config.json there .*whole pipeline folder"),
])
def test_controlnet_of_another_architecture_is_refused_before_caching(request, family, controlnet, message, dataset,
                                                                       tmp_path, capsys):
    import re

    fixture, _, sub = controlnet.partition("/")
    folder = request.getfixturevalue(fixture) / sub if sub else request.getfixturevalue(fixture)
    out = tmp_path / "out"
    script = load_script(f"train_controlnet_{family}.py")
    argv = _argv(_base(request, family), dataset, out, "--max_train_steps", 1, "--controlnet_model_name_or_path", folder,
                 family=family)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(folder) in errors[0] and re.search(message, errors[0]), errors
    assert not (out / "cache").exists()


def test_long_captions_are_counted_in_one_warning(tiny_sd3_dir, caplog):
    from skingen.backbones import backbone_class
    from skingen.train.caching import report_truncated_captions

    args = _script("sd3").parse_args(_argv(tiny_sd3_dir, "unused", "unused", "--max_sequence_length", 16))
    backbone = backbone_class("sd3")(args)
    captions = ["skin", "a keyboard skin in colour 0, iflyskin, writing a longer label", "x " * 80]
    assert backbone.count_truncated(captions) == {"CLIPTokenizer (77 tokens)": 1, "T5Tokenizer (16 tokens)": 2}
    with caplog.at_level(logging.WARNING, logger="skingen.train.caching"):
        report_truncated_captions(backbone, captions, SimpleNamespace(is_main_process=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 3 distinct captions are longer")


def test_flux_jsonl_for_train_with_absolute_paths_trains_as_the_dataset_folder(tiny_flux_dir, dataset, tmp_path):
    """diffusers' README_flux form: --jsonl_for_train names the user's own jsonl, whose image paths are absolute
    (or relative to the file's folder, here the second half): it trains on the same rows as the dataset folder."""
    rows = [json.loads(line) for line in (dataset / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    for i, row in enumerate(rows):
        for key in ("image", "conditioning_image"):
            row[key] = str(dataset / row[key]) if i < 2 else os.path.relpath(dataset / row[key], elsewhere)
    rows_file = elsewhere / "train_1m.jsonl"
    rows_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    folder_run = _train("flux", _argv(tiny_flux_dir, dataset, tmp_path / "folder", "--max_train_steps", 1))
    argv = _argv(tiny_flux_dir, dataset, tmp_path / "file", "--max_train_steps", 1)
    argv[argv.index("--train_data_dir"):argv.index("--train_data_dir") + 2] = ["--jsonl_for_train", str(rows_file)]
    file_run = _train("flux", argv)
    assert file_run.global_step == folder_run.global_step == 1
    assert _max_difference(_weights(tmp_path / "file"), _weights(tmp_path / "folder")) == 0
    with pytest.raises(SkingenError, match="not a .jsonl file"):
        _script("flux").parse_args(_argv(tiny_flux_dir, dataset, tmp_path, family="flux")[:2] + [
            "--jsonl_for_train", str(dataset), "--output_dir", str(tmp_path)])


def test_diffusers_command_lines_parse(dataset, tmp_path):
    sd3 = _script("sd3").parse_args([
        "--pretrained_model_name_or_path", "stabilityai/stable-diffusion-3.5-medium", "--train_data_dir", str(dataset),
        "--output_dir", str(tmp_path), "--resolution", "1024", "--learning_rate", "1e-5", "--max_train_steps", "15000",
        "--weighting_scheme", "mode", "--mode_scale", "1.29", "--precondition_outputs", "0", "--upcast_vae",
        "--num_extra_conditioning_channels", "0", "--dataset_preprocess_batch_size", "500", "--validation_steps", "100",
        "--train_batch_size", "1", "--gradient_accumulation_steps", "4", "--report_to", "none",
        "--validation_image", str(dataset / "conditioning_images" / "0.png"), "--validation_prompt", "a skin"])
    assert (sd3.backbone, sd3.weighting_scheme, sd3.precondition_outputs, sd3.max_sequence_length) == ("sd3", "mode", 0, 77)
    assert sd3.tracker_project_name == "sd3_train_controlnet" and sd3.text_loss_weight is None

    flux = _script("flux").parse_args([
        "--pretrained_model_name_or_path", "black-forest-labs/FLUX.1-dev", "--jsonl_for_train",
        str(dataset / "train.jsonl"), "--output_dir", str(tmp_path), "--conditioning_image_column", "conditioning_image",
        "--image_column", "image", "--caption_column", "text", "--resolution", "512", "--learning_rate", "2e-6",
        "--max_train_steps", "15000", "--num_double_layers", "4", "--num_single_layers", "0", "--guidance_scale", "3.5",
        "--use_adafactor", "--save_weight_dtype", "bf16", "--enable_model_cpu_offload", "--weighting_scheme", "none",
        "--report_to", "none", "--image_interpolation_mode", "lanczos"])
    assert flux.train_data_dir == str(dataset / "train.jsonl") and flux.backbone == "flux"
    assert flux.max_sequence_length == 512
    assert (flux.num_single_layers, flux.guidance_scale, flux.save_weight_dtype) == (0, 3.5, "bf16")
    with pytest.raises(SkingenError, match="--snr_gamma is min-SNR weighting of DDPM timesteps"):
        _script("flux").parse_args(_argv("some/model", dataset, tmp_path, "--snr_gamma", 5))


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_matching_input_target_and_x0_estimate(request, family):
    from skingen.backbones import backbone_class

    args = _script(family).parse_args(_argv(_base(request, family), "unused", "unused"))
    backbone = backbone_class(family)(args)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([backbone.draw_timestep(generator) for _ in range(400)])
    assert draws.min() >= 0 and draws.max() <= backbone.num_train_timesteps
    if family == "flux":  # FLUX trains on unshifted sigmas: logit-normal(0, 1) has median 0.5
        assert abs(draws.median().item() / 1000 - 0.5) < 0.08

    shape = (2, backbone.latent_channels, 8, 8)
    batch = {**backbone.encode_prompts(["a", "b"]), "pixel_values": torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1,
             "conditioning_pixel_values": torch.rand(2, 3, 64, 64, generator=generator),
             "noise": torch.randn(shape, generator=generator), "latent_noise": torch.randn(shape, generator=generator),
             "timesteps": torch.tensor([250.0, 750.0])}
    with torch.no_grad():
        output = backbone.forward(batch, backbone.new_controlnet(), torch.float32)
    sigma = torch.tensor([0.25, 0.75]).view(-1, 1, 1, 1)
    assert torch.allclose(output.noisy_latents, (1 - sigma) * output.latents + sigma * output.noise, atol=1e-6)
    velocity = output.model_pred if family == "flux" or not args.precondition_outputs else None
    if velocity is not None:
        assert torch.allclose(output.x0(), output.noisy_latents - sigma * velocity, atol=1e-5)
    else:  # SD3's preconditioned prediction is the x0 estimate itself
        assert torch.equal(output.x0(), output.model_pred.float())
    # An exact velocity gives back the clean latents.
    assert torch.allclose(output.noisy_latents - sigma * (output.noise - output.latents), output.latents, atol=1e-5)
    assert torch.allclose(output.signal, torch.tensor([0.75**2, 0.25**2]))


def test_flux_packing_matches_diffusers():
    from diffusers import FluxPipeline

    from skingen.backbones.flux import latent_image_ids, pack_latents, unpack_latents

    latents = torch.randn(2, 16, 8, 6)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), latents)
    assert torch.equal(latent_image_ids(8, 6, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_inference_side_check_reads_the_family_from_the_pipeline_folder(tiny_sdxl_dir, tiny_sd3_dir, tiny_flux_dir):
    from skingen.backbones.pipelines import check_controlnet_for_pipeline, family_of_pipeline

    assert [family_of_pipeline(d).name for d in (tiny_sdxl_dir, tiny_sd3_dir, tiny_flux_dir)] == ["sdxl", "sd3", "flux"]
    assert check_controlnet_for_pipeline(tiny_flux_dir / "controlnet", tiny_flux_dir) == str(tiny_flux_dir / "controlnet")
    with pytest.raises(SkingenError, match=r"controlnet: a FluxControlNetModel, but the base model .* is SD3"):
        check_controlnet_for_pipeline(tiny_flux_dir / "controlnet", tiny_sd3_dir, flag="--controlnet")
