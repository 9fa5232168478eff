"""Trainer options on the tiny pipeline, each doing what it claims: diffusers' whole command line, EMA, min-SNR and
the other loss options, aspect-ratio buckets, the UNet LoRA, a ControlNet on two conditioning images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from launching import launch_script
from PIL import Image, ImageDraw
from repo_scripts import load_script, tiny_training_argv
from safetensors.torch import load_file

from skingen.errors import SkingenError
from skingen.fileio import read_jsonl
from skingen.train.loop import build_arg_parser, parse_training_args, train

WEIGHTS = "diffusion_pytorch_model.safetensors"
# (width, height) of the rows: two wider than tall, two taller than wide, two square.
SIZES = [(128, 80), (128, 80), (80, 128), (80, 128), (64, 64), (64, 64)]

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory) -> Path:
    """6 rows of three aspect ratios, a text box each, and two conditioning kinds (outline and a filled "canny")."""
    root = tmp_path_factory.mktemp("mixed")
    for folder in ("images", "conditioning_images", "canny"):
        (root / folder).mkdir()
    rows = []
    for i, (width, height) in enumerate(SIZES):
        box = (width // 4, height // 4, width // 2, height // 2)
        image = Image.new("RGB", (width, height), (40 * i, 120, 200 - 30 * i))
        ImageDraw.Draw(image).rectangle(box, fill=(255, 255, 255))
        image.save(root / "images" / f"{i}.png")
        outline = Image.new("RGB", (width, height))
        ImageDraw.Draw(outline).rectangle(box, outline=(255, 255, 255))
        outline.save(root / "conditioning_images" / f"{i}.png")
        canny = Image.new("RGB", (width, height))
        ImageDraw.Draw(canny).rectangle(box, fill=(255, 255, 255))
        canny.save(root / "canny" / f"{i}.png")
        x0, y0, x1, y1 = box
        rows.append({"text": f"a keyboard skin {i}, iflyskin", "image": f"images/{i}.png",
                     "conditioning_image": f"conditioning_images/{i}.png",
                     "conditioning_image_canny": f"canny/{i}.png",
                     "box": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]], "texts": ["前往"]})
    (root / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return root


def _args(*argv):
    return parse_training_args(build_arg_parser(), tiny_training_argv(*argv))


def _generate(tiny_sdxl_dir, controlnet: Path, dataset: Path, out: Path, *extra) -> list[np.ndarray]:
    """inference.py on the first two rows of ``dataset``, 2 steps at 64 px; the images it wrote."""
    inference = load_script("inference.py")
    inference.main(["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--controlnet", str(controlnet),
                    "--dataset_dir", str(dataset), "--split", "train", "--max_samples", "2", "--output_dir", str(out),
                    "--num_inference_steps", "2", "--resolution", "64", "--device", "cpu", *map(str, extra)])
    return [np.asarray(Image.open(out / record["output"]), dtype=np.int16) for _, record in read_jsonl(out / "results.jsonl")]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


class Recorder:
    """An extra loss that adds nothing and records the batches the loop trains on."""

    name = "recorder"

    def __init__(self):
        self.batches = []

    def __call__(self, *, batch, output, **_):
        error = (output.model_pred.detach().float() - output.target.detach().float()) ** 2
        self.batches.append({key: (value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value)
                             for key, value in batch.items() if key != "boxes"}
                            | {"boxes": batch["boxes"], "per_sample_mse": error.flatten(1).mean(dim=1).cpu()})
        return (output.model_pred.float() ** 2).mean() * 0.0, {}


# ---------------------------------------------------------------------------------------------------------------
# diffusers' command line

# Every flag of diffusers' examples/controlnet/train_controlnet_sdxl.py (57), as in its parse_args().
DIFFUSERS_FLAGS = (
    "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "controlnet_model_name_or_path", "variant",
    "revision", "tokenizer_name", "output_dir", "cache_dir", "seed", "resolution", "crops_coords_top_left_h",
    "crops_coords_top_left_w", "train_batch_size", "num_train_epochs", "max_train_steps", "checkpointing_steps",
    "checkpoints_total_limit", "resume_from_checkpoint", "gradient_accumulation_steps", "gradient_checkpointing",
    "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "use_8bit_adam",
    "dataloader_num_workers", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm",
    "push_to_hub", "hub_token", "hub_model_id", "logging_dir", "allow_tf32", "report_to", "mixed_precision",
    "enable_xformers_memory_efficient_attention", "enable_npu_flash_attention", "set_grads_to_none", "dataset_name",
    "dataset_config_name", "train_data_dir", "image_column", "conditioning_image_column", "caption_column",
    "max_train_samples", "proportion_empty_prompts", "validation_prompt", "validation_image", "num_validation_images",
    "validation_steps", "tracker_project_name", "image_interpolation_mode",
)
# Flags that need hardware, packages or a network this machine lacks: parsed, not run.
NOT_RUN_HERE = {"use_8bit_adam": "bitsandbytes + CUDA", "enable_xformers_memory_efficient_attention": "xformers",
                "enable_npu_flash_attention": "an Ascend NPU", "push_to_hub": "the Hub",
                "dataset_name": "the Hub (and diffusers then reads --train_data_dir as the hub dataset's data_dir)"}


def diffusers_flags() -> tuple[str, ...]:
    """The flags of diffusers' example: read from it where diffusers is installed with its examples (a source
    checkout), else the list above."""
    import diffusers

    for root in Path(diffusers.__file__).resolve().parents[:4]:
        example = root / "examples" / "controlnet" / "train_controlnet_sdxl.py"
        if example.is_file():
            return tuple(re.findall(r'add_argument\(\s*"--([a-z0-9_]+)"', example.read_text(encoding="utf-8")))
    return DIFFUSERS_FLAGS


def test_every_diffusers_flag_is_a_trainer_flag():
    accepted = build_arg_parser()._option_string_actions
    flags = diffusers_flags()
    assert len(flags) >= 57 and not [flag for flag in flags if f"--{flag}" not in accepted]


def _diffusers_command_line(tiny_sdxl_dir: Path, dataset: Path, out: Path) -> list[str]:
    """Every diffusers flag with a value a short CPU run can use, written as diffusers' docs write them."""
    values = {
        "pretrained_model_name_or_path": tiny_sdxl_dir, "pretrained_vae_model_name_or_path": tiny_sdxl_dir / "sdxl_vae",
        "controlnet_model_name_or_path": tiny_sdxl_dir / "controlnet", "variant": "fp16", "revision": "main",
        "tokenizer_name": tiny_sdxl_dir / "tokenizer", "output_dir": out, "cache_dir": out.parent / "hf_cache",
        "seed": 0, "resolution": 64, "crops_coords_top_left_h": 0, "crops_coords_top_left_w": 0,
        "train_batch_size": 2, "num_train_epochs": 1, "max_train_steps": 1, "checkpointing_steps": 1,
        "checkpoints_total_limit": 1, "resume_from_checkpoint": "latest", "gradient_accumulation_steps": 1,
        "gradient_checkpointing": None, "learning_rate": 1e-5, "scale_lr": None, "lr_scheduler": "cosine",
        "lr_warmup_steps": 0, "lr_num_cycles": 1, "lr_power": 1.0, "use_8bit_adam": None,
        "dataloader_num_workers": 0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 1e-2,
        "adam_epsilon": 1e-08, "max_grad_norm": 1.0, "push_to_hub": None, "hub_token": "unused",
        "hub_model_id": "skin-controlnet", "logging_dir": "logs", "allow_tf32": None, "report_to": "tensorboard",
        "mixed_precision": "no", "enable_xformers_memory_efficient_attention": None,
        "enable_npu_flash_attention": None, "set_grads_to_none": None, "dataset_name": "user/skins",
        "dataset_config_name": "default", "train_data_dir": dataset, "image_column": "image",
        "conditioning_image_column": "conditioning_image", "caption_column": "text", "max_train_samples": 4,
        "proportion_empty_prompts": 0.5, "validation_prompt": "a keyboard skin, iflyskin",
        "validation_image": dataset / "conditioning_images" / "0.png", "num_validation_images": 1,
        "validation_steps": 1, "tracker_project_name": "sd_xl_train_controlnet", "image_interpolation_mode": "bicubic",
    }
    assert set(values) == set(DIFFUSERS_FLAGS)
    argv = []
    for flag in DIFFUSERS_FLAGS:
        argv += [f"--{flag}"] + ([] if values[flag] is None else [str(values[flag])])
    return argv


def _without(argv: list[str], flags) -> list[str]:
    kept, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            skipping = token[2:] in flags
        if not skipping:
            kept.append(token)
    return kept


@pytest.fixture(scope="module")
def fp16_variant_sdxl(tiny_sdxl_dir, tmp_path_factory) -> Path:
    """The tiny pipeline saved again as the fp16 variant (file names *.fp16.safetensors), for --variant fp16; a
    separate VAE (``sdxl_vae``) and the ControlNet in their plain form."""
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionXLPipeline

    out = tmp_path_factory.mktemp("variant")
    StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir).save_pretrained(out, variant="fp16")
    AutoencoderKL.from_pretrained(tiny_sdxl_dir / "vae").save_pretrained(out / "sdxl_vae")
    ControlNetModel.from_pretrained(tiny_sdxl_dir / "controlnet").save_pretrained(out / "controlnet")
    return out


def test_diffusers_command_line_parses_whole_and_runs_a_step(fp16_variant_sdxl, mixed_dataset, tmp_path):
    out = tmp_path / "run"
    argv = _diffusers_command_line(fp16_variant_sdxl, mixed_dataset, out)
    parsed = build_arg_parser().parse_args(argv)  # every flag is accepted
    assert parsed.image_interpolation_mode == "bicubic" and parsed.lr_scheduler == "cosine"

    result = train(parse_training_args(build_arg_parser(), _without(argv, NOT_RUN_HERE)))
    assert result.global_step == 1
    assert (out / WEIGHTS).is_file() and (out / "validation" / "step-1.png").is_file()
    assert (out / "checkpoint-1").is_dir() and list((out / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("flag", ["linear", "cosine_with_restarts", "polynomial", "constant_with_warmup",
                                  "piecewise_constant"])
def test_every_diffusers_lr_scheduler_is_accepted(flag, tiny_sdxl_dir, mixed_dataset, tmp_path):
    extra = ["--lr_step_rules", "1:1,0.1"] if flag == "piecewise_constant" else []
    args = _args(tiny_sdxl_dir, mixed_dataset, tmp_path, "--lr_scheduler", flag, *extra)
    assert args.lr_scheduler == flag


def test_npu_flash_attention_without_an_npu_is_a_clear_error(tiny_sdxl_dir, mixed_dataset, tmp_path):
    with pytest.raises(SkingenError, match="needs an Ascend NPU"):
        _args(tiny_sdxl_dir, mixed_dataset, tmp_path, "--enable_npu_flash_attention")


# ---------------------------------------------------------------------------------------------------------------
# EMA


def test_ema_follows_the_decay_formula_differs_from_raw_and_resumes_exactly(tiny_sdxl_dir, mixed_dataset, tmp_path):
    from diffusers import ControlNetModel

    ema = ["--use_ema", "--ema_decay", 0.5, "--checkpointing_steps", 1, "--learning_rate", 1e-2]
    straight = tmp_path / "straight"
    train(_args(tiny_sdxl_dir, mixed_dataset, straight, "--max_train_steps", 3, *ema))

    # Expected: diffusers' EMA over the raw weights after each step (checkpoint-N), decay min(0.5, (1+k)/(10+k)).
    expected = None
    for step in (1, 2, 3):
        raw = _weights(straight / f"checkpoint-{step}" / "controlnet")
        k = step - 1
        decay = 0.0 if k <= 0 else min(0.5, (1 + k) / (10 + k))
        expected = raw if expected is None else {n: expected[n] - (1 - decay) * (expected[n] - raw[n]) for n in raw}
    averaged = _weights(straight / "ema")
    assert _max_difference(averaged, expected) < 1e-6
    assert _max_difference(averaged, _weights(straight)) > 1e-4  # the average is not the raw weights
    ControlNetModel.from_pretrained(straight / "ema")  # a loadable ControlNet

    resumed = tmp_path / "resumed"
    train(_args(tiny_sdxl_dir, mixed_dataset, resumed, "--max_train_steps", 2, *ema))
    train(_args(tiny_sdxl_dir, mixed_dataset, resumed, "--max_train_steps", 3, *ema, "--resume_from_checkpoint", "latest"))
    assert _max_difference(_weights(resumed / "ema"), averaged) < 1e-6
    with pytest.raises(SkingenError, match="option state"):  # the EMA state cannot be dropped silently
        train(_args(tiny_sdxl_dir, mixed_dataset, resumed, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"))


# ---------------------------------------------------------------------------------------------------------------
# Loss options


def test_min_snr_weights_the_loss_by_the_formula_and_the_noise_options_change_the_input(tiny_sdxl_dir, mixed_dataset,
                                                                                         tmp_path):
    def first_step(*extra):
        recorder, logs = Recorder(), {}
        train(_args(tiny_sdxl_dir, mixed_dataset, tmp_path / "-".join(map(str, extra or ["plain"])),
                    "--max_train_steps", 1, "--train_batch_size", 6, *extra), recorder,
              on_step=lambda step, values: logs.update(values))
        return logs["loss_diffusion"], recorder.batches[0]

    plain, batch = first_step()
    gamma = 1.0
    weighted, snr_batch = first_step("--snr_gamma", gamma)
    # The schedule's SNR(t) = abar / (1 - abar) (tiny pipeline: SDXL's scaled_linear betas), the per-sample
    # weight min(SNR, gamma) / SNR for epsilon prediction, on the per-sample mean squared error.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, dim=0)[snr_batch["timesteps"].long()]
    snr = alpha_bar / (1 - alpha_bar)
    weights = torch.clamp(snr, max=gamma) / snr
    assert (weights < 1).any() and (weights == 1).any()  # both regimes in this batch
    assert weighted == pytest.approx((weights * snr_batch["per_sample_mse"].double()).mean().item(), rel=1e-4)
    assert plain == pytest.approx(snr_batch["per_sample_mse"].double().mean().item(), rel=1e-4)  # same batch

    offset, offset_batch = first_step("--noise_offset", 0.1)
    assert offset != plain and offset_batch["offset_noise"].shape == (6, 4, 1, 1)
    assert torch.equal(offset_batch["noise"], batch["noise"])  # the other draws stay as they were
    perturbed, perturbed_batch = first_step("--input_perturbation", 0.1)
    assert perturbed != plain and perturbed_batch["perturbation_noise"].shape == batch["noise"].shape

    # diffusers' timestep bias: a range weighted a million times over takes every sample of the batch.
    _, biased_batch = first_step("--timestep_bias_strategy", "range", "--timestep_bias_begin", 900,
                                 "--timestep_bias_end", 1000, "--timestep_bias_multiplier", 1e6)
    assert (batch["timesteps"] < 900).any() and (biased_batch["timesteps"] >= 900).all()


def _control_effect(controlnet_dir: Path, condition: torch.Tensor) -> float:
    """Mean change of the ControlNet's residuals when its control is replaced by a black image."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(controlnet_dir)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, controlnet.config.cross_attention_dim, generator=generator)
    pooled = controlnet.config.projection_class_embeddings_input_dim - 6 * controlnet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled, generator=generator), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64.0]])}
    with torch.no_grad():
        with_control, _ = controlnet(latents, torch.tensor([800]), text, condition, added_cond_kwargs=added, return_dict=False)
        black, _ = controlnet(latents, torch.tensor([800]), text, torch.zeros_like(condition), added_cond_kwargs=added,
                              return_dict=False)
    return sum((a - b).abs().mean().item() for a, b in zip(with_control, black)) / len(black)


def test_kaiming_conditioning_init_lets_the_control_steer_a_new_controlnet_sooner(tiny_sdxl_dir, mixed_dataset, tmp_path):
    condition = torch.from_numpy(np.asarray(Image.open(mixed_dataset / "conditioning_images" / "0.png").convert("RGB")
                                            .resize((64, 64)), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    effects = {}
    for init in ("diffusers", "kaiming"):
        out = tmp_path / init
        train(_args(tiny_sdxl_dir, mixed_dataset, out, "--max_train_steps", 4, "--controlnet_conditioning_init", init))
        effects[init] = _control_effect(out, condition)
    # The same 4 steps: with diffusers' init the control barely reaches the residuals; with Kaiming it does.
    assert effects["kaiming"] > 5 * effects["diffusers"] > 0

    with pytest.raises(SkingenError, match="overwrite the conditioning encoder"):
        _args(tiny_sdxl_dir, mixed_dataset, tmp_path / "x", "--controlnet_model_name_or_path", tiny_sdxl_dir / "controlnet",
              "--controlnet_conditioning_init", "kaiming")


# ---------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets


BUCKETS = ["--enable_bucket", "--min_bucket_reso", 32, "--max_bucket_reso", 128, "--bucket_reso_steps", 16]


def test_buckets_train_each_aspect_ratio_at_its_size_with_time_ids_and_boxes(tiny_sdxl_dir, mixed_dataset, tmp_path):
    recorder = Recorder()
    train(_args(tiny_sdxl_dir, mixed_dataset, tmp_path / "run", "--max_train_steps", 6, *BUCKETS), recorder)
    expected = {(128, 80): (48, 80), (80, 128): (80, 48), (64, 64): (64, 64)}  # (w, h) -> training (h, w)
    seen = set()
    for batch in recorder.batches:
        sizes = {tuple(s.shape[-2:]) for s in batch["conditioning_pixel_values"]}
        assert len(sizes) == 1  # one bucket per batch
        (height, width), = sizes
        assert batch["noise"].shape[-2:] == (height // 8, width // 8)
        for row_id, time_ids, boxes in zip(batch["row_ids"], batch["time_ids"], batch["boxes"]):
            original = SIZES[int(Path(row_id).stem)]
            assert expected[original] == (height, width)
            # SDXL time ids: original (h, w), crop (top, left), target (h, w).
            assert time_ids[:2].tolist() == [original[1], original[0]] and time_ids[4:].tolist() == [height, width]
            # The box (a quarter of the image from its top-left quarter point) follows the resize and crop.
            scale = max(width / original[0], height / original[1])  # scaled to cover the bucket
            assert boxes[0, 0, 0].item() == pytest.approx(original[0] // 4 * scale - time_ids[3].item(), abs=1e-4)
            seen.add((height, width))
    assert seen == set(expected.values())


def test_buckets_keep_exact_resume(tiny_sdxl_dir, mixed_dataset, tmp_path):
    common = ["--max_train_steps", 4, "--checkpointing_steps", 2, *BUCKETS, "--embeddings_cache_dir", tmp_path / "c"]
    straight = tmp_path / "straight"
    train(_args(tiny_sdxl_dir, mixed_dataset, straight, *common))
    stopped = tmp_path / "stopped"
    train(_args(tiny_sdxl_dir, mixed_dataset, stopped, *common[:1], 2, *common[2:]))
    train(_args(tiny_sdxl_dir, mixed_dataset, stopped, *common, "--resume_from_checkpoint", "latest"))
    assert _max_difference(_weights(stopped), _weights(straight)) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# UNet LoRA


def test_unet_lora_is_saved_loads_into_the_pipeline_and_changes_the_output(tiny_sdxl_dir, mixed_dataset, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    lora = ["--unet_lora_rank", 4, "--learning_rate", 1e-2, "--checkpointing_steps", 1]
    out = tmp_path / "run"
    train(_args(tiny_sdxl_dir, mixed_dataset, out, "--max_train_steps", 2, *lora))
    trained = load_file(out / "pytorch_lora_weights.safetensors")
    assert trained and all(key.startswith("unet.") for key in trained)
    resumed = tmp_path / "resumed"  # the adapter is part of the checkpoint: resuming continues it exactly
    train(_args(tiny_sdxl_dir, mixed_dataset, resumed, "--max_train_steps", 1, *lora))
    train(_args(tiny_sdxl_dir, mixed_dataset, resumed, "--max_train_steps", 2, *lora, "--resume_from_checkpoint", "latest"))
    assert _max_difference(load_file(resumed / "pytorch_lora_weights.safetensors"), trained) < 1e-6
    assert _max_difference(_weights(resumed), _weights(out)) < 1e-6
    pipeline = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl_dir, controlnet=ControlNetModel.from_pretrained(out))
    pipeline.set_progress_bar_config(disable=True)
    control = Image.open(mixed_dataset / "conditioning_images" / "4.png")

    def generate():
        return pipeline("a keyboard skin, iflyskin", image=control, num_inference_steps=2, height=64, width=64,
                        output_type="np", generator=torch.Generator().manual_seed(0)).images

    without = generate()
    pipeline.load_lora_weights(out)
    assert abs(generate() - without).max() > 1e-3

    plain = _generate(tiny_sdxl_dir, out, mixed_dataset, tmp_path / "plain")
    with_lora = _generate(tiny_sdxl_dir, out, mixed_dataset, tmp_path / "lora", "--lora", out)
    assert all(np.abs(a - b).max() > 0 for a, b in zip(plain, with_lora))


# ---------------------------------------------------------------------------------------------------------------
# Several conditioning images


def test_two_condition_controlnet_trains_with_per_column_dropout_and_generates(tiny_sdxl_dir, mixed_dataset, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    out = tmp_path / "run"
    recorder = Recorder()
    train(_args(tiny_sdxl_dir, mixed_dataset, out, "--max_train_steps", 2,
                "--conditioning_image_column", "conditioning_image", "conditioning_image_canny",
                "--conditioning_dropout_prob", 0.0, 1.0, "--validation_prompt", "a keyboard skin",
                "--validation_image", f"{mixed_dataset / 'conditioning_images' / '4.png'},{mixed_dataset / 'canny' / '4.png'}",
                "--num_validation_images", 1, "--validation_inference_steps", 2), recorder)
    assert Image.open(out / "validation" / "step-2.png").size == (64 * 2, 64)  # sampled with both conditions
    for batch in recorder.batches:
        control = batch["conditioning_pixel_values"]
        assert control.shape[1] == 6
        assert control[:, :3].amax() > 0 and control[:, 3:].amax() == 0  # the second column always dropped
    controlnet = ControlNetModel.from_pretrained(out)
    assert controlnet.config.conditioning_channels == 6

    pipeline = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_dir, controlnet=controlnet)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline("a keyboard skin", image=torch.rand(1, 6, 64, 64), num_inference_steps=2, height=64, width=64,
                      output_type="np").images
    assert images.shape == (1, 64, 64, 3)

    # The second condition feeds the ControlNet's residuals.
    latents, timestep = torch.randn(1, 4, 8, 8), torch.tensor([500])
    pooled = controlnet.config.projection_class_embeddings_input_dim - 6 * controlnet.config.addition_time_embed_dim
    text = {"encoder_hidden_states": torch.randn(1, 77, controlnet.config.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, pooled), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    first = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        residuals = [controlnet(latents, timestep, controlnet_cond=torch.cat([first, second], dim=1), **text,
                                return_dict=False)[1] for second in (torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64))]
    assert (residuals[0] - residuals[1]).abs().max() > 0

    # inference.py takes the same column list, and refuses a row short of images.
    both = _generate(tiny_sdxl_dir, out, mixed_dataset, tmp_path / "both",
                     "--conditioning_image_column", "conditioning_image", "conditioning_image_canny")
    assert len(both) == 2 and both[0].shape == (64, 64, 3)
    with pytest.raises(SkingenError, match="take 2"):
        _generate(tiny_sdxl_dir, out, mixed_dataset, tmp_path / "one")


def test_a_canny_controlnet_fine_tuned_on_two_conditions_keeps_its_first_input(tiny_sdxl_dir, mixed_dataset, tmp_path):
    from diffusers import ControlNetModel

    out = tmp_path / "run"
    train(_args(tiny_sdxl_dir, mixed_dataset, out, "--max_train_steps", 1, "--learning_rate", 0.0,
                "--controlnet_model_name_or_path", tiny_sdxl_dir / "controlnet",
                "--conditioning_image_column", "conditioning_image", "conditioning_image_canny"))
    pretrained = ControlNetModel.from_pretrained(tiny_sdxl_dir / "controlnet").controlnet_cond_embedding.conv_in.weight
    widened = ControlNetModel.from_pretrained(out).controlnet_cond_embedding.conv_in.weight
    assert torch.equal(widened[:, :3], pretrained) and widened[:, 3:].abs().max() == 0


# ---------------------------------------------------------------------------------------------------------------
# Several processes


def test_two_processes_with_buckets_lora_and_ema_train_like_one(tiny_sdxl_dir, mixed_dataset, tmp_path):
    """Bucketed global batches split across processes, the LoRA's gradients averaged across them (the UNet is not
    wrapped for DDP) and the EMA on every process: 2 processes x batch 1 train like 1 process x batch 2."""


    options = ["--max_train_steps", 3, *BUCKETS, "--unet_lora_rank", 4, "--use_ema", "--ema_decay", 0.5,
               "--learning_rate", 1e-2]
    one = tmp_path / "one"
    train(_args(tiny_sdxl_dir, mixed_dataset, one, *options))
    two = tmp_path / "two"
    argv = tiny_training_argv(tiny_sdxl_dir, mixed_dataset, two, *options, "--train_batch_size", 1)
    finished = launch_script("train_controlnet_sdxl.py", [str(a) for a in argv])
    assert finished.returncode == 0, finished.stderr[-3000:]
    # Same data and noise; only float summation order differs (Adam magnifies that where gradients are ~0).
    for name in (WEIGHTS, f"ema/{WEIGHTS}", "pytorch_lora_weights.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert (differences > 1e-5).float().mean().item() < 1e-3, name


def test_validation_grids_sample_with_the_ema_weights(tiny_sdxl_dir, mixed_dataset, tmp_path, monkeypatch):
    import skingen.train.loop as training

    seen = []
    out = tmp_path / "run"

    def capture(pairs, *, accelerator, controlnet, step, **_):
        seen.append({k: v.detach().clone() for k, v in accelerator.unwrap_model(controlnet).state_dict().items()})
        return out / "validation" / f"step-{step}.png"

    monkeypatch.setattr(training, "log_validation", capture)
    train(_args(tiny_sdxl_dir, mixed_dataset, out, "--max_train_steps", 3, "--use_ema", "--ema_decay", 0.5,
                "--learning_rate", 1e-2, "--validation_prompt", "a keyboard skin", "--validation_image",
                mixed_dataset / "conditioning_images" / "4.png", "--validation_steps", 3))
    assert len(seen) == 1  # at step 3
    assert _max_difference(seen[0], _weights(out / "ema")) < 1e-6
    assert _max_difference(seen[0], _weights(out)) > 1e-4  # not the raw weights, which are back in place after it
