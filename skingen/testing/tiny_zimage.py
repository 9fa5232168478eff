"""A tiny random-weight Z-Image pipeline (``ZImagePipeline``), built offline from configs.

Same folder layout, classes and config keys as ``Tongyi-MAI/Z-Image-Turbo``: a Qwen3 text encoder with the local
Qwen tokenizer (chat template, special tokens; ``skingen.qwen_tokenizer``), a ``ZImageTransformer2DModel`` with 6
layers (so the Fun ControlNet Union's every-5th-layer places are 0 and 5) and 2 refiner layers, FLUX's 16-channel
VAE factors and Z-Image-Turbo's flow-matching scheduler (static shift 3). ``controlnet=True`` also writes a
``ZImageControlNetModel`` built as a new one is for training (``skingen.backbones.zimage.new_zimage_controlnet``).
``vae=`` builds it around a fitted FLUX-style VAE instead (``scripts/fit_tiny_vae.py --backbone zimage``): the
transformer (and the ControlNet's control input) then takes that VAE's latent channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .qwen_tokenizer import build_qwen_tokenizer
from .tiny_models import _check_out_dir, _save, _vae_16
from .vae_fitting import load_fitted_vae

TINY_ZIMAGE = {"dim": 32, "n_heads": 2, "n_layers": 6, "n_refiner_layers": 2, "text_hidden": 32, "text_layers": 2}


def _qwen3_encoder(tokenizer, seed: int):
    from transformers import Qwen3Config, Qwen3Model

    hidden = TINY_ZIMAGE["text_hidden"]
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=TINY_ZIMAGE["text_layers"], num_attention_heads=2, num_key_value_heads=2,
                         head_dim=hidden // 2, max_position_embeddings=2048, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return Qwen3Model(config)


def tiny_zimage_transformer(seed: int, latent_channels: int = 16):
    from diffusers import ZImageTransformer2DModel

    dim = TINY_ZIMAGE["dim"]
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=dim, n_layers=TINY_ZIMAGE["n_layers"],
        n_refiner_layers=TINY_ZIMAGE["n_refiner_layers"], n_heads=TINY_ZIMAGE["n_heads"],
        n_kv_heads=TINY_ZIMAGE["n_heads"], norm_eps=1e-5, qk_norm=True, cap_feat_dim=TINY_ZIMAGE["text_hidden"],
        rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[1024, 512, 512])
    # Some diffusers versions leave the pad tokens as torch.empty: give them defined values.
    with torch.no_grad():
        transformer.x_pad_token.normal_(std=0.02)
        transformer.cap_pad_token.normal_(std=0.02)
    return transformer


def build_tiny_zimage(out_dir: str | os.PathLike, seed: int = 0, controlnet: bool = False,
                      vae: str | os.PathLike | None = None) -> Path:
    """Write a randomly initialised Z-Image-shaped pipeline to ``out_dir`` (and ``out_dir/controlnet``).
    ``vae``: a fitted ``AutoencoderKL`` folder with a ``shift_factor`` to use instead of the random 16-channel one."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from ..backbones.zimage import new_zimage_controlnet

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, "Z-Image")
    fitted_vae = load_fitted_vae(vae, "zimage") if vae is not None else None
    tokenizer = build_qwen_tokenizer()
    text_encoder = _qwen3_encoder(tokenizer, seed)
    transformer = tiny_zimage_transformer(seed + 1, fitted_vae.config.latent_channels if fitted_vae else 16)
    vae = fitted_vae or _vae_16("flux", seed + 2)  # Z-Image uses FLUX.1's VAE
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipeline = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)

    def make_controlnet():
        torch.manual_seed(seed + 3)
        return new_zimage_controlnet(transformer)

    return _save(pipeline, out_dir, make_controlnet if controlnet else None)
