"""Z-Image and Qwen-Image ControlNets on their tiny pipelines, offline.

Per family: the tiny pipeline loads with diffusers' own ``from_pretrained`` (and skingen's loader); the trainer's
cached prompt encoding and its control latents equal what diffusers' ControlNet pipeline computes; a short run
with the text and edge losses, EMA, gradient checkpointing and a validation grid saves a ControlNet the diffusers
class loads; resume is exact; inference.py generates through the family's ControlNet pipeline with the trained
folder; the memory options fail clearly on a CPU. The 3-seed evidence is a bench (bench/new_backbones_evidence.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from box_skins import write_box_skins
from launching import launch
from PIL import Image, ImageDraw
from repo_scripts import REPO, load_script
from safetensors.torch import load_file

from skingen.errors import SkingenError

FAMILIES = ("zimage", "qwenimage")
NUM_ROWS = 4
CLASSES = {  # base pipeline, ControlNet pipeline, ControlNet
    "zimage": ("ZImagePipeline", "ZImageControlNetPipeline", "ZImageControlNetModel"),
    "qwenimage": ("QwenImagePipeline", "QwenImageControlNetPipeline", "QwenImageControlNetModel"),
}
CAPTIONS = ['a keyboard skin writing "前往"', "blue keys", ""]

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 rows of 80x64 skins with one text box each and short captions (T5 reads them whole)."""
    return write_box_skins(tmp_path_factory.mktemp("skins"), NUM_ROWS)


def _base(request, family: str) -> Path:
    return request.getfixturevalue(f"tiny_{family}_dir")


def _argv(base, dataset, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(dataset), "--output_dir", str(out),
            "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--seed", "0", "--report_to", "none", "--max_sequence_length", "64", *map(str, extra)]


def _train(family, argv, **kwargs):
    from skingen.train.loop import train

    script = load_script(f"train_controlnet_{family}.py")
    args = script.parse_args(argv)
    return train(args, **kwargs)


def _backbone(request, family, *extra):
    from skingen.backbones import backbone_class

    args = load_script(f"train_controlnet_{family}.py").parse_args(_argv(_base(request, family), "unused", "unused",
                                                                         *extra))
    return backbone_class(family)(args)


def _controlnet_pipeline(request, family):
    import diffusers

    base = _base(request, family)
    _, pipeline_class, controlnet_class = CLASSES[family]
    controlnet = getattr(diffusers, controlnet_class).from_pretrained(base / "controlnet")
    return getattr(diffusers, pipeline_class).from_pretrained(base, controlnet=controlnet)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_loads_with_diffusers_and_skingen(request, family):
    import diffusers

    base = _base(request, family)
    pipeline_class, _, controlnet_class = CLASSES[family]
    pipeline = getattr(diffusers, pipeline_class).from_pretrained(base)
    assert type(pipeline).__name__ == pipeline_class
    getattr(diffusers, controlnet_class).from_pretrained(base / "controlnet")
    template = pipeline.tokenizer.apply_chat_template([{"role": "user", "content": "前往"}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=True)
    assert template == "<|im_start|>user\n前往<|im_end|>\n<|im_start|>assistant\n"
    if family == "qwenimage":  # the template prefix the pipeline drops is 34 tokens, as with the real tokenizer
        prefix = pipeline.prompt_template_encode.split("{}")[0]
        assert len(pipeline.tokenizer(prefix).input_ids) == pipeline.prompt_template_encode_start_idx == 34
    backbone = _backbone(request, family)
    assert type(backbone.denoiser).__name__ == type(pipeline.transformer).__name__


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prompt_encoding_equals_the_pipelines(request, family):
    pipeline = _controlnet_pipeline(request, family)
    backbone = _backbone(request, family)
    cached = backbone.encode_prompts(CAPTIONS)
    if family == "zimage":
        expected, _ = pipeline.encode_prompt(list(CAPTIONS), device="cpu", do_classifier_free_guidance=False,
                                             max_sequence_length=64)
        batch = {key: value for key, value in cached.items()}
        got = backbone.caption_features(batch, torch.float32)
        assert [len(e) for e in got] == [len(e) for e in expected]
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    else:
        expected, mask = pipeline.encode_prompt(list(CAPTIONS), device="cpu", max_sequence_length=64)
        embeds, got_mask = backbone.batch_prompts(cached["prompt_embeds"], cached["prompt_embeds_mask"])
        assert torch.equal(embeds, expected) and torch.equal(got_mask, mask)
        # One caption alone: the pipeline passes no mask, and neither does the step.
        alone = backbone.encode_prompts(CAPTIONS[:1])
        assert backbone.batch_prompts(alone["prompt_embeds"], alone["prompt_embeds_mask"])[1] is None


@pytest.mark.parametrize("family", FAMILIES)
def test_control_latents_equal_the_pipelines(request, family):
    from skingen.backbones.flux import pack_latents
    from skingen.train.batches import image_to_tensor

    pipeline = _controlnet_pipeline(request, family)
    backbone = _backbone(request, family)
    control = Image.new("RGB", (64, 64))
    ImageDraw.Draw(control).rectangle((8, 8, 40, 30), outline=(255, 255, 255), width=2)
    seen = []
    forward = pipeline.controlnet.forward

    def record(*args, **kwargs):
        seen.append(kwargs["controlnet_cond"] if "controlnet_cond" in kwargs else args[3])
        return forward(*args, **kwargs)

    pipeline.controlnet.forward = record
    pipeline(prompt="skin", control_image=control, height=64, width=64, num_inference_steps=2,
             generator=torch.Generator().manual_seed(3), output_type="latent",
             **({"guidance_scale": 0.0} if family == "zimage" else {}))
    batch = {"conditioning_pixel_values": image_to_tensor(control, normalize=False)[None]}
    if family == "zimage":
        expected = seen[0]  # (B, C, 1, h, w)
        ours = backbone.control_latents(batch, torch.float32).unsqueeze(2)
    else:  # the pipeline draws from the posterior with its generator; the trainer takes the mode
        expected = seen[0]
        ours = pack_latents(backbone.control_latents(batch, torch.float32, generator=torch.Generator().manual_seed(3)))
    assert ours.shape == expected.shape and torch.equal(ours, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_short_run_with_losses_ema_and_validation_saves_a_controlnet_diffusers_loads(request, family, dataset, tmp_path):
    import diffusers

    out = tmp_path / "run"
    logs = {}
    result = _train(family, _argv(_base(request, family), dataset, out, "--max_train_steps", 2,
                                  "--text_loss_weight", 0.01, "--text_loss_max_timestep", 1000,
                                  "--edge_loss_weight", 0.2, "--edge_loss_crop_size", 32, "--use_ema",
                                  "--gradient_checkpointing", "--validation_prompt", "skin", "--validation_image",
                                  dataset / "conditioning_images" / "0.png", "--num_validation_images", 1,
                                  "--validation_inference_steps", 2),
                    on_step=lambda step, values: logs.update({step: values}))
    assert result.global_step == 2
    controlnet = getattr(diffusers, CLASSES[family][2]).from_pretrained(out)
    fresh = load_file(_base(request, family) / "controlnet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(out / "diffusion_pytorch_model.safetensors")
    assert trained.keys() == fresh.keys()  # only the ControlNet's own weights, never the borrowed base modules
    zero_init = "after_proj" if family == "zimage" else "controlnet_blocks"
    moved = [k for k in trained if zero_init in k and trained[k].abs().max() > 0]
    assert moved and all(fresh[k].abs().max() == 0 for k in moved)  # zero at the start, moved by training
    assert controlnet is not None and (out / "ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert Image.open(out / "validation" / "step-2.png").size == (64 * 2, 64)
    assert logs[2]["loss"] == pytest.approx(logs[2]["loss_diffusion"] + logs[2]["loss_text"] + logs[2]["loss_edge"])
    assert logs[1]["boxes_used"] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_after_stop_matches_uninterrupted_run(request, family, dataset, tmp_path):
    base = _base(request, family)
    common = ["--max_train_steps", 3, "--proportion_empty_prompts", 0.5, "--embeddings_cache_dir", tmp_path / "cache"]
    straight = tmp_path / "straight"
    _train(family, _argv(base, dataset, straight, *common))
    stopped = tmp_path / "stopped"
    with pytest.raises(SkingenError, match=r"NaN/inf for 1 steps in a row.*checkpoint-2"):
        _train(family, _argv(base, dataset, stopped, *common, "--checkpointing_steps", 2,
                             "--debug_inject_nan_at_step", 3, "--max_nonfinite_steps", 1))
    result = _train(family, _argv(base, dataset, stopped, *common, "--checkpointing_steps", 2,
                                  "--resume_from_checkpoint", "latest"))
    assert result.global_step == 3
    a, b = load_file(stopped / "diffusion_pytorch_model.safetensors"), load_file(straight / "diffusion_pytorch_model.safetensors")
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
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
        a = load_file(tmp_path / f"{family}-two" / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / f"{family}-one" / "diffusion_pytorch_model.safetensors")
        differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert (differences > 1e-5).float().mean().item() < 1e-3, family


@pytest.mark.parametrize("family", FAMILIES)
def test_inference_generates_through_the_family_controlnet_pipeline(request, family, tmp_path):
    import inference

    base = _base(request, family)
    controlnet = getattr(__import__("diffusers"), CLASSES[family][2]).from_pretrained(base / "controlnet")
    torch.manual_seed(0)
    with torch.no_grad():  # re-draw the zero-initialised layers, as after training, so the control matters
        for param in controlnet.parameters():
            if param.abs().sum() == 0:
                param.normal_(0.0, 0.5 / (param.shape[-1] if param.dim() > 1 else 1) ** 0.5)
    controlnet.save_pretrained(tmp_path / "controlnet")
    controls = []
    for index in range(2):
        image = Image.new("RGB", (64, 64))
        ImageDraw.Draw(image).rectangle((4 + 20 * index, 4, 40 + 20 * index, 30), fill=(255, 255, 255))
        image.save(tmp_path / f"control{index}.png")
        controls.append(str(tmp_path / f"control{index}.png"))
    inference.main(["--pretrained_model_name_or_path", str(base), "--controlnet", str(tmp_path / "controlnet"),
                    "--output_dir", str(tmp_path / "out"), "--num_inference_steps", "2", "--device", "cpu",
                    "--prompt", "a keyboard skin", "--control_image", *controls, "--seed", "0"])
    images = sorted((tmp_path / "out" / "images").glob("*.png"))
    assert len(images) == 2
    first, second = (np.asarray(Image.open(path).convert("RGB"), dtype=np.int16) for path in images)
    assert first.shape == (64, 64, 3) and np.abs(first - second).max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_base_quantization_is_a_clear_error_without_cuda(request, family, dataset, tmp_path, capsys):
    from skingen.errors import run_cli

    script = load_script(f"train_controlnet_{family}.py")
    argv = _argv(_base(request, family), dataset, tmp_path / "out", "--base_quantization", "nf4")
    with pytest.raises(SystemExit) as exited:
        run_cli(script.main, argv)
    assert exited.value.code == 2
    assert "--base_quantization nf4: quantizing the frozen transformer needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(("family", "preset"), [("zimage", "zimage_glyph_1024"), ("qwenimage", "qwenimage_glyph_1328")])
def test_preset_parses_through_its_trainer(family, preset, tmp_path):
    import yaml

    settings = yaml.safe_load((REPO / "configs" / "train" / f"{preset}.yaml").read_text(encoding="utf-8"))
    assert settings.pop("use_8bit_adam") is True  # bitsandbytes is CUDA-only: checked on a GPU machine, not here
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    args = load_script(f"train_controlnet_{family}.py").parse_args(["--config", str(tmp_path / "preset.yaml")])
    assert args.train_batch_size * args.gradient_accumulation_steps * 8 == 64  # the public recipes' batch on 8 GPUs
    assert args.gradient_checkpointing and args.mixed_precision == "bf16"
    if family == "zimage":
        assert args.control_layers_places == [0, 5, 10, 15, 20, 25] and args.learning_rate == 2e-5
    else:
        assert args.num_layers == 5 and args.learning_rate == 4e-5 and args.resolution == 1328


@pytest.mark.slow
def test_gpu_check_tiny_measures_every_family_on_cpu(tmp_path):
    gpu_check = load_script("bench/gpu_check.py")
    rows = gpu_check.main(["--tiny", "--steps", "1", "--options", "diffusers_example", "gc", "gc_adam8bit_int8",
                           "--out", str(tmp_path / "gpu.json")])
    measured = {(row["family"], row["option"]) for row in rows if "skipped" not in row}
    assert measured == {("sdxl", "diffusers_example")} | {(family, "gc") for family in gpu_check.FAMILIES}
    assert all(row["loss_finite"] and row["step_s"] > 0 for row in rows if "skipped" not in row)
    skipped = {(row["family"], row["option"]): row["skipped"] for row in rows if "skipped" in row}
    assert set(skipped) == {("zimage", "gc_adam8bit_int8"), ("qwenimage", "gc_adam8bit_int8")}
    assert all("needs CUDA" in reason for reason in skipped.values())
    assert json.loads((tmp_path / "gpu.json").read_text())["device"] == "CPU"


@pytest.mark.slow
def test_memory_estimate_covers_both_families(capsys):
    memory_estimate = load_script("bench/memory_estimate.py")
    memory_estimate.main()
    table = capsys.readouterr().out
    for family in ("zimage", "qwenimage"):
        assert f"| {family} | 1 GPU, 8-bit Adam |" in table
        totals = {base: float(line.rsplit("|", 2)[1]) for line in table.splitlines()
                  for base in memory_estimate.FROZEN_BYTES if line.startswith(f"| {family} | {base} (")}
        assert totals["nf4"] < totals["int8"] == totals["fp8"] < totals["bf16"]  # a quantized base saves memory


@pytest.mark.parametrize(("family", "controlnet", "message"), [
    ("zimage", "tiny_qwenimage_dir/controlnet", "a QwenImageControlNetModel, but the base model .* is Z-Image"),
    ("qwenimage", "tiny_zimage_dir/controlnet", "a ZImageControlNetModel, but the base model .* is Qwen-Image"),
    ("qwenimage", "tiny_qwenimage_dir/transformer", "holds a QwenImageTransformer2DModel .*, not a ControlNet"),
])
def test_controlnet_of_another_architecture_is_refused_before_caching(request, family, controlnet, message, dataset,
                                                                       tmp_path, capsys):
    import re

    from skingen.errors import run_cli

    fixture, _, sub = controlnet.partition("/")
    out = tmp_path / "out"
    argv = _argv(_base(request, family), dataset, out, "--controlnet_model_name_or_path",
                 request.getfixturevalue(fixture) / sub)
    with pytest.raises(SystemExit):
        run_cli(load_script(f"train_controlnet_{family}.py").main, argv)
    assert re.search(message, capsys.readouterr().err)
    assert not (out / "cache").exists()  # nothing was cached
