"""The tiny SDXL pipeline loads and generates through diffusers' own pipelines; components load like SDXL base."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from repo_scripts import load_script

from skingen.backbones.sdxl import compute_time_ids, encode_prompt, load_or_init_controlnet, load_sdxl_components
from skingen.errors import SkingenError
from skingen.testing.tiny_sdxl import build_clip_tokenizer, build_tiny_sdxl, count_parameters, fit_tiny_vae


def _file_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def components(tiny_sdxl_dir):
    return load_sdxl_components(tiny_sdxl_dir)


def test_saved_pipeline_has_sdxl_layout_in_safetensors(tiny_sdxl_dir):
    for sub in ("unet", "vae", "controlnet"):
        assert (tiny_sdxl_dir / sub / "diffusion_pytorch_model.safetensors").is_file()
    for sub in ("text_encoder", "text_encoder_2"):
        assert (tiny_sdxl_dir / sub / "model.safetensors").is_file()
    assert not list(tiny_sdxl_dir.rglob("*.bin"))
    assert (tiny_sdxl_dir / "scheduler" / "scheduler_config.json").is_file()


def test_pipeline_generates_requested_size(tiny_sdxl_dir, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    assert pipe.vae_scale_factor == 8
    result = pipe(
        "a blue keyboard skin", height=64, width=96, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    )
    image = result.images[0]
    assert image.size == (96, 64)
    assert image.mode == "RGB"


def test_controlnet_pipeline_generates_requested_size(tiny_sdxl_dir, monkeypatch):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    controlnet = ControlNetModel.from_pretrained(tiny_sdxl_dir / "controlnet")
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_dir, controlnet=controlnet)
    control = Image.new("RGB", (64, 64))
    out = pipe(
        ["a red keyboard skin", "a green one"],
        image=control,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert [im.size for im in out.images] == [(64, 64), (64, 64)]


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, tiny_sdxl_dir):
    again = build_tiny_sdxl(tmp_path / "again", preset="tiny", seed=0, controlnet=True)
    assert _file_digests(again) == _file_digests(tiny_sdxl_dir)
    other = _file_digests(build_tiny_sdxl(tmp_path / "other", preset="tiny", seed=1, controlnet=False))
    reference = _file_digests(tiny_sdxl_dir)
    assert other["unet/diffusion_pytorch_model.safetensors"] != reference["unet/diffusion_pytorch_model.safetensors"]
    assert other["unet/config.json"] == reference["unet/config.json"]
    assert "controlnet/config.json" not in other


def test_build_refuses_to_replace_unrelated_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(SkingenError, match="not a diffusers pipeline"):
        build_tiny_sdxl(folder)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_load_sdxl_components_round_trip(components, tiny_sdxl_dir):
    from diffusers import DDPMScheduler

    assert isinstance(components.noise_scheduler, DDPMScheduler)
    assert components.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert components.unet.config.addition_embed_type == "text_time"
    assert components.vae.config.scaling_factor == pytest.approx(0.13025)
    assert components.tokenizer_one.model_max_length == 77
    # Same weights as saved: a reload of the UNet matches tensor for tensor.
    from diffusers import UNet2DConditionModel

    reloaded = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    for (name, a), (_, b) in zip(components.unet.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_separate_vae_path_is_used(tiny_sdxl_dir):
    comps = load_sdxl_components(tiny_sdxl_dir, vae_model_name_or_path=tiny_sdxl_dir / "vae")
    assert comps.vae.config.latent_channels == 4


def test_tokenizer_handles_any_text_and_pads_to_77():
    tokenizer = build_clip_tokenizer()
    ids = tokenizer(['iflyskin, writing "前往" 🙂'], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids[1 : ids.index(tokenizer.eos_token_id)]
    assert "前往" in tokenizer.decode(ids, skip_special_tokens=True)


def test_encode_prompt_shapes_match_unet(components):
    prompt_embeds, pooled = encode_prompt(
        ["a keyboard", 'writing "前往"'], components.tokenizers, components.text_encoders
    )
    assert prompt_embeds.shape == (2, 77, components.unet.config.cross_attention_dim)
    assert pooled.shape == (2, components.text_encoder_two.config.projection_dim)
    # Different prompts give different embeddings (the tokenizer is not collapsing text).
    assert not torch.allclose(prompt_embeds[0], prompt_embeds[1])


def test_compute_time_ids():
    ids = compute_time_ids((1024, 768), (12, 0), (512, 512), dtype=torch.float16)
    assert ids.dtype == torch.float16
    assert ids.tolist() == [1024, 768, 12, 0, 512, 512]
    with pytest.raises(ValueError):
        compute_time_ids((1024,), (0, 0), (512, 512))


def test_controlnet_training_step_runs_and_reports_time(components, tiny_sdxl_dir):
    controlnet = load_or_init_controlnet(components.unet, tiny_sdxl_dir / "controlnet")
    unet, vae, scheduler = components.unet, components.vae, components.noise_scheduler
    unet.requires_grad_(False)
    resolution = 128
    prompt_embeds, pooled = encode_prompt(["a keyboard"], components.tokenizers, components.text_encoders)
    added = {
        "text_embeds": pooled,
        "time_ids": compute_time_ids((resolution, resolution), (0, 0), (resolution, resolution))[None],
    }
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, resolution, resolution, generator=generator) * 2 - 1
    control = torch.rand(1, 3, resolution, resolution, generator=generator)

    start = time.perf_counter()
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
    assert latents.shape == (1, 4, resolution // 8, resolution // 8)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([500])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    down, mid = controlnet(
        noisy,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs=added,
        controlnet_cond=control,
        return_dict=False,
    )
    pred = unet(
        noisy,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs=added,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0]
    loss = torch.nn.functional.mse_loss(pred, noise)
    loss.backward()
    elapsed = time.perf_counter() - start
    print(f"\ntiny ControlNet forward+backward at {resolution}px: {elapsed * 1000:.0f} ms")

    assert torch.isfinite(loss)
    grads = [p.grad for p in controlnet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in unet.parameters())


def test_new_controlnet_from_unet_matches_unet_weights(components):
    controlnet = load_or_init_controlnet(components.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    assert torch.equal(controlnet.conv_in.weight, components.unet.conv_in.weight)
    assert controlnet.config.conditioning_embedding_out_channels == (8, 8, 16, 16)


@pytest.mark.parametrize(
    "make_path, expected",
    [
        (lambda tmp: tmp / "does-not-exist", "folder not found"),
        (lambda tmp: tmp, "missing tokenizer/, tokenizer_2/, text_encoder/"),
    ],
)
def test_bad_model_path_names_expected_layout(tmp_path, make_path, expected):
    with pytest.raises(SkingenError) as info:
        load_sdxl_components(make_path(tmp_path))
    message = str(info.value)
    assert expected in message
    assert "model_index.json" in message and "unet/" in message


def test_broken_component_names_the_subfolder(tmp_path, tiny_sdxl_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl_dir, broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(SkingenError, match=r"broken/unet: could not load the UNet"):
        load_sdxl_components(broken)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SkingenError, match="could not load the first tokenizer"):
        load_sdxl_components("nobody-here/no-such-sdxl-model")


def test_bad_controlnet_path(tmp_path, components):
    with pytest.raises(SkingenError, match="no config.json there"):
        load_or_init_controlnet(components.unet, tmp_path)
    with pytest.raises(SkingenError, match="folder not found"):
        load_or_init_controlnet(components.unet, tmp_path / "nope")


def test_make_tiny_sdxl_script(tmp_path, capsys):
    script = load_script("scripts/make_tiny_sdxl.py")
    out = tmp_path / "cli"
    script.main(["--out", str(out), "--seed", "3"])
    printed = capsys.readouterr().out
    assert f"wrote a tiny SDXL pipeline (seed 3) to {out}" in printed
    from diffusers import UNet2DConditionModel

    unet_count = count_parameters(UNet2DConditionModel.from_pretrained(out / "unet"))
    assert f"{unet_count:,} parameters" in printed.split("unet/")[1].splitlines()[0]
    assert (out / "model_index.json").is_file()
    assert not (out / "controlnet").exists()


def test_fit_tiny_vae_lowers_the_reconstruction_error_and_keeps_the_folder_loadable(tmp_path, tiny_sdxl_dir):
    import shutil

    from diffusers import AutoencoderKL

    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_sdxl_dir, pipeline)
    ramp = torch.linspace(-1, 1, 64)
    images = [torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64), -ramp[None, :].expand(64, 64)])]
    stats = fit_tiny_vae(pipeline, images, steps=60, seed=0)
    assert stats["final_l1"] < 0.5 * stats["initial_l1"]
    vae = AutoencoderKL.from_pretrained(pipeline / "vae")
    assert vae.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    with torch.no_grad():
        latents = vae.encode(images[0][None]).latent_dist.mode() * vae.config.scaling_factor
    assert latents.std().item() == pytest.approx(1.0, rel=1e-3)  # unit-variance latents, as SDXL's factor gives
    assert not [p for p in pipeline.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    with pytest.raises(SkingenError, match="must be >= 1"):
        fit_tiny_vae(pipeline, images, steps=0)
    with pytest.raises(SkingenError, match="needs at least one image"):
        fit_tiny_vae(pipeline, [], steps=1)
    with pytest.raises(SkingenError, match="no VAE config.json"):
        fit_tiny_vae(tmp_path / "nothing", images, steps=1)
