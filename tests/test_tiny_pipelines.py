"""The tiny SD3 and FLUX pipelines load with diffusers' own classes and generate, like the real weights would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from repo_scripts import load_script

from skingen.errors import SkingenError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _control_image(size: int = 64) -> Image.Image:
    image = np.zeros((size, size, 3), np.uint8)
    image[size // 4 : size // 2, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(image)


def test_t5_tokenizer_behaves_like_t5(tiny_sd3_dir):
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(tiny_sd3_dir, subfolder="tokenizer_3")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer(["Shift key 2", "键"], padding="max_length", max_length=12, truncation=True).input_ids
    assert tokenizer.convert_ids_to_tokens(ids[0][:9]) == ["▁S", "h", "i", "f", "t", "▁k", "e", "y", "▁2"]
    assert ids[0][9:] == [tokenizer.eos_token_id, 0, 0]
    assert ids[1][1:3] == [tokenizer.unk_token_id, tokenizer.eos_token_id]  # like T5, no pieces for CJK
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "Shift key 2"


@pytest.mark.parametrize("backbone", ["sd3", "flux"])
def test_tiny_pipeline_loads_with_diffusers_classes(backbone, tiny_sd3_dir, tiny_flux_dir):
    import diffusers

    folder = {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}[backbone]
    pipeline_class, controlnet_class = {
        "sd3": (diffusers.StableDiffusion3Pipeline, diffusers.SD3ControlNetModel),
        "flux": (diffusers.FluxPipeline, diffusers.FluxControlNetModel),
    }[backbone]
    pipeline = pipeline_class.from_pretrained(folder)
    assert isinstance(pipeline.scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
    assert pipeline.vae.config.latent_channels == 16 and pipeline.vae.config.shift_factor > 0
    controlnet = controlnet_class.from_pretrained(folder / "controlnet")
    # The ControlNet starts as a copy of the transformer's first blocks.
    first_block = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(controlnet.state_dict()[first_block], pipeline.transformer.state_dict()[first_block])
    image = pipeline(
        "a keyboard skin", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("backbone", ["sd3", "flux"])
def test_controlnet_pipeline_generates_and_is_seeded(backbone, tiny_sd3_dir, tiny_flux_dir):
    import diffusers

    folder = {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}[backbone]
    pipeline_class, controlnet_class = {
        "sd3": (diffusers.StableDiffusion3ControlNetPipeline, diffusers.SD3ControlNetModel),
        "flux": (diffusers.FluxControlNetPipeline, diffusers.FluxControlNetModel),
    }[backbone]
    pipeline = pipeline_class.from_pretrained(
        folder, controlnet=controlnet_class.from_pretrained(folder / "controlnet")
    )
    pipeline.set_progress_bar_config(disable=True)

    def generate(seed: int) -> np.ndarray:
        result = pipeline(
            "a keyboard skin",
            control_image=_control_image(),
            height=64,
            width=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
        return result.images[0]

    first, again, other = generate(0), generate(0), generate(1)
    assert first.shape == (64, 64, 3)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1e-3


def test_script_builds_each_backbone_reproducibly(tmp_path, capsys):
    script = load_script("scripts/make_tiny_pipeline.py")
    for backbone in ("sd3", "flux"):
        for name in ("a", "b"):
            script.main(["--backbone", backbone, "--out", str(tmp_path / backbone / name), "--controlnet"])
        report = capsys.readouterr().out
        assert "transformer/" in report and "controlnet/" in report and "text_encoder_2/" in report
        for part in ("transformer", "controlnet", "text_encoder_2", "vae"):
            weights = sorted((tmp_path / backbone / "a" / part).glob("*.safetensors"))
            assert weights, part
            twins = [tmp_path / backbone / "b" / part / w.name for w in weights]
            assert [w.read_bytes() for w in weights] == [t.read_bytes() for t in twins], part
    script.main(["--backbone", "sdxl", "--out", str(tmp_path / "sdxl")])
    assert "unet/" in capsys.readouterr().out and (tmp_path / "sdxl" / "unet" / "config.json").is_file()


def test_script_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    script = load_script("scripts/make_tiny_pipeline.py")
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(SkingenError, match="not a diffusers pipeline"):
        script.main(["--backbone", "flux", "--out", str(tmp_path)])
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(SkingenError, match="only the 'tiny' preset"):
        script.main(["--backbone", "sd3", "--preset", "small", "--out", str(tmp_path / "new")])


def test_fit_latent_shift_centres_and_scales_the_16_channel_latents(tmp_path):
    from diffusers import AutoencoderKL

    from skingen.testing.tiny_models import build_tiny_flux, fit_latent_shift

    build_tiny_flux(tmp_path / "flux")
    images = [torch.rand(3, 64, 64) * 2 - 1 for _ in range(3)]
    fitted = fit_latent_shift(tmp_path / "flux", images)
    vae = AutoencoderKL.from_pretrained(tmp_path / "flux" / "vae")
    assert vae.config.shift_factor == pytest.approx(fitted["shift_factor"])
    with torch.no_grad():
        latents = vae.encode(torch.stack(images)).latent_dist.mode()
    normalised = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(normalised.mean().item()) < 1e-4 and normalised.std().item() == pytest.approx(1.0, abs=1e-4)
