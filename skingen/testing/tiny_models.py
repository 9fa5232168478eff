"""Tiny random-weight pipelines of each backbone family (SDXL, SD3/SD3.5, FLUX.1), built offline from configs.

Each is saved in diffusers format with the same folder layout, component classes and config keys as the real
weights (``stable-diffusion-xl-base-1.0``, ``stable-diffusion-3.5-medium``, ``FLUX.1-dev``), so everything
downstream loads it through the same ``from_pretrained`` code as the real models, on a CPU, without a download.

SD3 and FLUX share their pieces: CLIP text encoders with the byte-level CLIP tokenizer of the tiny SDXL, a T5
encoder with a small Unigram tokenizer saved as ``T5TokenizerFast`` (T5's layout: ``<pad>`` 0, ``</s>`` 1,
``<unk>`` 2), a 16-channel VAE with a ``shift_factor`` and a ``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import importlib
import os
import string
from pathlib import Path
from typing import Any

import torch

from ..backbones import FAMILIES, backbone_class
from ..errors import SkingenError
from ..fileio import AtomicDirectory
from .tiny_sdxl import EOS_TOKEN, TOKENIZER_MAX_LENGTH, build_clip_tokenizer, build_tiny_sdxl

BACKBONES = tuple(FAMILIES)  # every registered family has a tiny builder here (its Backbone.tiny_builder)
T5_MAX_LENGTH = 512  # model_max_length of the T5 tokenizers shipped with SD3 and FLUX

# Sizes of the tiny SD3/FLUX models: a training step at 64-128 px takes a few tens of milliseconds on one CPU core.
# The CLIP widths add up to at most the T5 width (SD3 pads the CLIP embeddings to T5's width and concatenates).
TINY: dict[str, Any] = {
    "clip_hidden": 32,
    "clip_layers": 2,
    "clip_heads": 2,
    "clip_projection": 32,
    "t5_d_model": 64,
    "t5_layers": 2,
    "t5_heads": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "vae_blocks": (8, 8, 16, 16),  # four blocks: 8x downsampling, as in the real VAEs
    "vae_norm_groups": 4,
    "default_resolution": 128,
}

# The real families' VAE latent normalisation: latents = (encode(x) - shift_factor) * scaling_factor.
VAE_FACTORS = {
    "sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609},
    "flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159},
}


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


def build_t5_tokenizer():
    """A T5 tokenizer (Unigram over ASCII pieces) made with ``tokenizers``; nothing is downloaded.

    Special tokens sit where T5's do (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2); like the real one, characters it has no
    piece for (e.g. CJK) become ``<unk>``, and every sequence ends with ``</s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = [f"▁{c}" for c in string.ascii_letters + string.digits]
    pieces = ["▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    # Higher scores for word-initial pieces, so "▁a" wins over "▁" + "a".
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -3.0) for piece in words] + [(piece, -5.0) for piece in pieces]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )


def _clip_config(tokenizer, hidden_act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY["clip_hidden"],
        intermediate_size=TINY["clip_hidden"] * 4,
        num_hidden_layers=TINY["clip_layers"],
        num_attention_heads=TINY["clip_heads"],
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=TINY["clip_projection"],
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer, seed: int):
    """A T5 v1.1-style encoder (gated GELU feed-forward, relative attention), like the T5-XXL SD3 and FLUX use."""
    from transformers import T5Config, T5EncoderModel

    d_model = TINY["t5_d_model"]
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // TINY["t5_heads"],
        d_ff=d_model * 2,
        num_layers=TINY["t5_layers"],
        num_heads=TINY["t5_heads"],
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config)


def _vae_16(family: str, seed: int):
    from diffusers import AutoencoderKL

    blocks = TINY["vae_blocks"]
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        norm_num_groups=TINY["vae_norm_groups"],
        latent_channels=16,
        sample_size=TINY["default_resolution"],
        use_quant_conv=False,  # SD3's and FLUX's VAEs have no quant convs
        use_post_quant_conv=False,
        **VAE_FACTORS[family],
    )


def _check_out_dir(out_dir: Path, what: str) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
        raise SkingenError(
            f"{out_dir}: folder exists, is not empty and is not a diffusers pipeline; "
            f"choose a new or empty --out folder (a previous tiny {what} there would be replaced)"
        )


def _save(pipeline, out_dir: Path, controlnet_factory=None) -> Path:
    """Save the pipeline (and the ControlNet ``controlnet_factory()`` makes, to ``controlnet/``) atomically."""
    with AtomicDirectory(out_dir) as tmp_dir:
        pipeline.save_pretrained(tmp_dir, safe_serialization=True)
        if controlnet_factory is not None:
            controlnet_factory().save_pretrained(Path(tmp_dir) / "controlnet", safe_serialization=True)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5


def build_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0, controlnet: bool = False) -> Path:
    """Write a randomly initialised SD3.5-medium-shaped pipeline (``StableDiffusion3Pipeline``) to ``out_dir``.

    CLIP-L and CLIP-G (with projection) plus T5, an MMDiT with SD3.5-medium's features (a dual-attention block,
    RMS q/k norm, 2x2 patches), a 16-channel VAE and SD3's flow-matching scheduler (shift 3). ``controlnet=True``
    also writes ``SD3ControlNetModel.from_transformer`` to ``out_dir/controlnet`` (the first layer: a ControlNet
    copies the transformer's leading blocks, never its last, context-only one).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3ControlNetModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, "SD3")
    tokenizer = build_clip_tokenizer(pad_token=EOS_TOKEN)
    tokenizer_2 = build_clip_tokenizer(pad_token=EOS_TOKEN)
    tokenizer_3 = build_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, "quick_gelu"))  # CLIP-L
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, "gelu"))  # OpenCLIP bigG
    text_encoder_3 = _t5_encoder(tokenizer_3, seed + 2)

    inner_dim = TINY["attention_head_dim"] * TINY["num_attention_heads"]
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(
        sample_size=TINY["default_resolution"] // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=TINY["attention_head_dim"],
        num_attention_heads=TINY["num_attention_heads"],
        joint_attention_dim=TINY["t5_d_model"],
        caption_projection_dim=inner_dim,
        pooled_projection_dim=2 * TINY["clip_projection"],  # both CLIPs' projected pooled outputs, concatenated
        pos_embed_max_size=64,  # up to 64 patches a side: 1024 px
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = _vae_16("sd3", seed + 4)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )

    def make_controlnet():
        torch.manual_seed(seed + 5)
        return SD3ControlNetModel.from_transformer(
            transformer, num_layers=transformer.config.num_layers - 1, num_extra_conditioning_channels=0
        )

    return _save(pipeline, out_dir, make_controlnet if controlnet else None)


# ---------------------------------------------------------------------------------------------------------------
# FLUX.1


def build_tiny_flux(out_dir: str | os.PathLike, seed: int = 0, controlnet: bool = False) -> Path:
    """Write a randomly initialised FLUX.1-dev-shaped pipeline (``FluxPipeline``) to ``out_dir``.

    CLIP-L (pooled output) plus T5, a FLUX transformer with double- and single-stream blocks, guidance embedding
    (guidance-distilled, as FLUX.1-dev) and 3-axis RoPE, a 16-channel VAE (latents packed 2x2 into 64-channel
    tokens) and FLUX's flow-matching scheduler with resolution-dependent shift. ``controlnet=True`` also writes
    ``FluxControlNetModel.from_transformer`` to ``out_dir/controlnet`` (all transformer blocks).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, "FLUX")
    tokenizer = build_clip_tokenizer(pad_token=EOS_TOKEN)
    tokenizer_2 = build_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, "quick_gelu"))
    text_encoder_2 = _t5_encoder(tokenizer_2, seed + 1)

    head_dim = TINY["attention_head_dim"]
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=TINY["num_attention_heads"],
        joint_attention_dim=TINY["t5_d_model"],
        pooled_projection_dim=TINY["clip_hidden"],  # CLIP's pooled output
        guidance_embeds=True,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),  # FLUX's 16/56/56 of 128, scaled
    )
    vae = _vae_16("flux", seed + 3)
    # FLUX.1-dev/scheduler/scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )

    def make_controlnet():
        torch.manual_seed(seed + 4)
        return FluxControlNetModel.from_transformer(
            transformer,
            num_layers=transformer.config.num_layers,
            num_single_layers=transformer.config.num_single_layers,
            attention_head_dim=transformer.config.attention_head_dim,
            num_attention_heads=transformer.config.num_attention_heads,
        )

    return _save(pipeline, out_dir, make_controlnet if controlnet else None)


# ---------------------------------------------------------------------------------------------------------------


def build_tiny_pipeline(
    backbone: str, out_dir: str | os.PathLike, *, seed: int = 0, controlnet: bool = False, preset: str = "tiny"
) -> Path:
    """Build the tiny pipeline of ``backbone`` (one of BACKBONES); ``preset`` applies to SDXL (tiny, small)."""
    if backbone not in BACKBONES:
        raise SkingenError(f"--backbone {backbone!r}: unknown backbone; choose one of {', '.join(BACKBONES)}")
    name = backbone_class(backbone).tiny_builder
    # A family's builder lives here or in its own module, skingen/testing/tiny_<family>.py.
    builder = globals().get(name) or getattr(importlib.import_module(f"{__package__}.tiny_{backbone}"), name)
    if builder is build_tiny_sdxl:
        return build_tiny_sdxl(out_dir, preset=preset, seed=seed, controlnet=controlnet)
    if preset != "tiny":
        raise SkingenError(f"--preset {preset}: the {backbone} pipeline has only the 'tiny' preset")
    return builder(out_dir, seed=seed, controlnet=controlnet)


def fit_latent_shift(pipeline_dir: str | os.PathLike, images) -> dict[str, float]:
    """Set a 16-channel VAE's ``shift_factor`` and ``scaling_factor`` so its latents of ``images`` (``(3, H, W)``
    tensors in [-1, 1]) have zero mean and unit standard deviation, as SD3's and FLUX's were chosen; after
    ``skingen.testing.tiny_sdxl.fit_tiny_vae`` (which sets only the scale). Saved back to ``pipeline_dir/vae`` atomically."""
    from diffusers import AutoencoderKL

    vae_dir = Path(pipeline_dir) / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        latents = vae.encode(torch.stack([image.float() for image in images])).latent_dist.mode()
    shift, std = latents.mean().item(), latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / max(std, 1e-6))
    with AtomicDirectory(vae_dir) as tmp_dir:
        vae.save_pretrained(tmp_dir, safe_serialization=True)
    return {"shift_factor": shift, "scaling_factor": float(vae.config.scaling_factor)}
