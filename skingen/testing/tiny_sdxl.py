"""The tiny SDXL pipeline built from configs, the byte-level CLIP tokenizer, and fitting a tiny VAE.

The tiny pipeline is saved in diffusers format, so everything downstream loads it through the
same ``from_pretrained`` code path as the real ``stable-diffusion-xl-base-1.0``. Loading, prompt encoding,
time ids and ControlNets of SDXL live in ``skingen.backbones.sdxl``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import SkingenError
from ..fileio import AtomicDirectory

# Subfolders of a diffusers SDXL pipeline that training needs (scheduler config is read by DDPMScheduler).
SDXL_SUBFOLDERS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet", "scheduler")

SDXL_LAYOUT_HELP = (
    "expected a diffusers SDXL pipeline folder (like stable-diffusion-xl-base-1.0) holding model_index.json and "
    "the subfolders " + ", ".join(f"{name}/" for name in SDXL_SUBFOLDERS) + "; "
    "build a tiny one offline with `python scripts/make_tiny_sdxl.py --out DIR`"
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_MAX_LENGTH = 77  # CLIP's context length, as in SDXL

# Per-preset sizes. Text encoder widths add up to cross_attention_dim (SDXL concatenates both encoders'
# penultimate hidden states); the pooled embedding (encoder 2's projection) plus 6 time ids of
# addition_time_embed_dim each make projection_class_embeddings_input_dim.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "text_hidden": (32, 32),
        "text_layers": 2,
        "text_heads": 2,
        "projection_dim": 32,
        "unet_blocks": (32, 64),
        "unet_down": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "unet_up": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "unet_heads": (2, 4),
        "unet_transformer_layers": (1, 1),
        "unet_layers_per_block": 1,
        "unet_norm_groups": 16,
        "time_embed_dim": 8,
        "default_resolution": 128,
        "vae_blocks": (8, 8, 16, 16),
        "vae_norm_groups": 4,
        "vae_layers_per_block": 1,
        "controlnet_conditioning_channels": (8, 8, 16, 16),
    },
    "small": {
        "text_hidden": (64, 64),
        "text_layers": 4,
        "text_heads": 4,
        "projection_dim": 64,
        "unet_blocks": (64, 128, 256),
        "unet_down": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "unet_up": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "unet_heads": (2, 4, 8),
        "unet_transformer_layers": (1, 1, 2),
        "unet_layers_per_block": 2,
        "unet_norm_groups": 32,
        "time_embed_dim": 32,
        "default_resolution": 256,
        "vae_blocks": (32, 64, 64, 64),
        "vae_norm_groups": 32,
        "vae_layers_per_block": 1,
        "controlnet_conditioning_channels": (16, 32, 64, 128),
    },
}


# ---------------------------------------------------------------------------------------------------------------
# Building a tiny SDXL pipeline offline


def _byte_level_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    by_byte = dict(zip(printable, codepoints))
    return [chr(by_byte[byte]) for byte in range(256)]


def build_clip_tokenizer(pad_token: str = EOS_TOKEN):
    """A CLIP tokenizer with only byte-level symbols (no merges): every string tokenizes, nothing is downloaded.

    Vocabulary: the 256 byte symbols, their end-of-word forms, then the two special tokens (last, as in CLIP).
    """
    from transformers import CLIPTokenizer

    symbols = _byte_level_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    # Load through the files a real CLIP tokenizer ships (vocab.json + merges.txt), the same path users take.
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(
            vocab=str(Path(tmp, "vocab.json")),
            merges=str(Path(tmp, "merges.txt")),
            pad_token=pad_token,
            model_max_length=TOKENIZER_MAX_LENGTH,
        )
    return tokenizer


def _text_encoder_config(preset: dict, index: int, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import CLIPTextConfig

    hidden = preset["text_hidden"][index]
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=preset["text_layers"],
        num_attention_heads=preset["text_heads"],
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=preset["projection_dim"],
        hidden_act="gelu" if index == 1 else "quick_gelu",  # SDXL: OpenCLIP bigG uses gelu, CLIP-L quick_gelu
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _sdxl_euler_scheduler():
    from diffusers import EulerDiscreteScheduler

    # stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=False,
    )


def build_tiny_sdxl(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    seed: int = 0,
    controlnet: bool = False,
    vae: str | os.PathLike | None = None,
) -> Path:
    """Write a randomly initialised SDXL pipeline (diffusers format, safetensors) to ``out_dir``.

    Same architecture family and file layout as SDXL base (text_time conditioning, two CLIP text encoders,
    VAE downsampling by 8), small enough for CPU. ``controlnet=True`` also writes a matching
    ``ControlNetModel`` to ``out_dir/controlnet``. The same seed gives byte-identical weights.
    ``vae``: a fitted ``AutoencoderKL`` folder to use instead of a random one (e.g. ``assets/tiny_skin_vae``);
    the UNet then takes its latent channels.
    """
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if preset not in PRESETS:
        raise SkingenError(f"unknown tiny SDXL preset {preset!r}; choose one of {sorted(PRESETS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
        raise SkingenError(
            f"{out_dir}: folder exists, is not empty and is not a diffusers pipeline; "
            "choose a new or empty --out folder (a previous tiny SDXL there would be replaced)"
        )
    p = PRESETS[preset]
    pretrained_vae = load_downsample_by_8_vae(vae) if vae is not None else None
    latent_channels = pretrained_vae.config.latent_channels if pretrained_vae is not None else 4

    tokenizer_one = build_clip_tokenizer(pad_token=EOS_TOKEN)
    tokenizer_two = build_clip_tokenizer(pad_token=EOS_TOKEN)
    ids = {
        "vocab_size": len(tokenizer_one),
        "bos_id": tokenizer_one.bos_token_id,
        "eos_id": tokenizer_one.eos_token_id,
        "pad_id": tokenizer_one.pad_token_id,
    }

    # Each component gets its own seed so its weights do not depend on what was built before it.
    torch.manual_seed(seed)
    text_encoder_one = CLIPTextModel(_text_encoder_config(p, 0, **ids))
    torch.manual_seed(seed + 1)
    text_encoder_two = CLIPTextModelWithProjection(_text_encoder_config(p, 1, **ids))

    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=p["default_resolution"] // 8,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=p["unet_down"],
        up_block_types=p["unet_up"],
        block_out_channels=p["unet_blocks"],
        layers_per_block=p["unet_layers_per_block"],
        attention_head_dim=p["unet_heads"],
        transformer_layers_per_block=p["unet_transformer_layers"],
        norm_num_groups=p["unet_norm_groups"],
        cross_attention_dim=sum(p["text_hidden"]),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=p["time_embed_dim"],
        projection_class_embeddings_input_dim=p["projection_dim"] + 6 * p["time_embed_dim"],
    )

    torch.manual_seed(seed + 3)
    vae = pretrained_vae or AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(p["vae_blocks"]),
        up_block_types=("UpDecoderBlock2D",) * len(p["vae_blocks"]),
        block_out_channels=p["vae_blocks"],
        layers_per_block=p["vae_layers_per_block"],
        norm_num_groups=p["vae_norm_groups"],
        latent_channels=4,
        sample_size=p["default_resolution"],
        scaling_factor=0.13025,  # SDXL's VAE scaling factor
    )

    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder_one,
        text_encoder_2=text_encoder_two,
        tokenizer=tokenizer_one,
        tokenizer_2=tokenizer_two,
        unet=unet,
        scheduler=_sdxl_euler_scheduler(),
        add_watermarker=False,
    )
    with AtomicDirectory(out_dir) as tmp_dir:
        pipeline.save_pretrained(tmp_dir, safe_serialization=True)
        if controlnet:
            torch.manual_seed(seed + 4)
            control = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=p["controlnet_conditioning_channels"]
            )
            control.save_pretrained(Path(tmp_dir) / "controlnet", safe_serialization=True)
    return out_dir


def load_downsample_by_8_vae(vae_dir: str | os.PathLike):
    """An ``AutoencoderKL`` folder for a tiny SDXL: it must downsample by 8, as SDXL's and the ControlNet's
    conditioning embedding do."""
    from diffusers import AutoencoderKL

    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").is_file():
        raise SkingenError(f"{vae_dir}: no config.json; give a diffusers AutoencoderKL folder (e.g. assets/tiny_skin_vae)")
    try:
        vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise SkingenError(f"{vae_dir}: not a loadable AutoencoderKL ({error}); give a diffusers VAE folder") from None
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != 8:
        raise SkingenError(f"{vae_dir}: this VAE downsamples by {factor}; a tiny SDXL needs one that downsamples by 8 "
                           "(four block_out_channels)")
    return vae


def count_parameters(module: torch.nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Fitting a tiny VAE


def set_unit_latent_scale(vae, pixels: torch.Tensor) -> None:
    """Set ``scaling_factor`` so the scaled latents of ``pixels`` have unit standard deviation (how SD/SDXL chose
    theirs)."""
    with torch.no_grad():
        latent_std = vae.encode(pixels).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / max(latent_std, 1e-6))


def fit_tiny_vae(
    pipeline_dir: str | os.PathLike,
    images: Sequence[torch.Tensor],
    steps: int = 300,
    seed: int = 0,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-6,
) -> dict[str, float]:
    """Fit the VAE of a tiny pipeline to reconstruct ``images`` and save it back to ``pipeline_dir/vae``.

    A random tiny VAE decodes noise, so nothing that reads pixels (the OCR text loss) can be tried on it. This
    runs ``steps`` full-batch Adam steps of L1 reconstruction (through a sampled latent, as training encodes)
    plus ``kl_weight`` times the KL term, on CPU. ``images`` are ``(3, H, W)`` tensors in [-1, 1] of one size
    (``skingen.train.batches.training_pixels`` makes them). ``scaling_factor`` is then set so the scaled latents
    have unit standard deviation (how SD/SDXL chose theirs). The folder is replaced atomically.
    Returns ``initial_l1``, ``final_l1`` (mean absolute reconstruction error of the posterior mean) and
    ``scaling_factor``.
    """
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from .vae_fitting import reconstruction_l1, vae_reconstruction_loss

    if steps < 1:
        raise SkingenError(f"--vae_fit_steps must be >= 1, got {steps}")
    if len(images) == 0:
        raise SkingenError("fitting the tiny VAE needs at least one image")
    vae_dir = Path(pipeline_dir) / "vae"
    if not (vae_dir / "config.json").is_file():
        raise SkingenError(f"{vae_dir}: no VAE config.json; {SDXL_LAYOUT_HELP}")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    pixels = torch.stack([image.float() for image in images])

    initial = reconstruction_l1(vae, pixels)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    vae.train()
    for _ in tqdm(range(steps), desc="fitting the tiny VAE", leave=False):
        loss = vae_reconstruction_loss(vae, pixels, generator, kl_weight=kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval()
    final = reconstruction_l1(vae, pixels)
    set_unit_latent_scale(vae, pixels)
    with AtomicDirectory(vae_dir) as tmp_dir:
        vae.save_pretrained(tmp_dir, safe_serialization=True)
    return {"initial_l1": initial, "final_l1": final, "scaling_factor": float(vae.config.scaling_factor)}
