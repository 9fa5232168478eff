"""A tiny random-weight Qwen-Image pipeline (``QwenImagePipeline``), built offline from configs.

Same folder layout, classes and config keys as ``Qwen/Qwen-Image``: a Qwen2.5-VL text encoder (a small vision
tower included, as the class has one) with the local Qwen tokenizer (its template prefix is the 34 tokens the
pipeline drops; ``skingen.qwen_tokenizer``), a ``QwenImageTransformer2DModel`` with 10 dual-stream blocks (so the
5-block ControlNet's outputs each feed 2, as the real 5 feed 12 of 60), an ``AutoencoderKLQwenImage`` with the
real 16 channels, 8x downsampling and ``latents_mean``/``latents_std``, and Qwen-Image's scheduler (dynamic shift).
``controlnet=True`` also writes ``QwenImageControlNetModel.from_transformer`` (5 blocks) to ``out_dir/controlnet``.
``vae=`` builds it around a fitted ``AutoencoderKLQwenImage`` instead (``scripts/fit_tiny_vae.py --backbone
qwenimage``): the transformer then takes ``4 * z_dim`` packed input channels and predicts ``z_dim``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .qwen_tokenizer import build_qwen_tokenizer
from .tiny_models import _check_out_dir, _save
from .vae_fitting import load_fitted_vae

TINY_QWENIMAGE = {"attention_head_dim": 16, "num_attention_heads": 2, "num_layers": 10, "text_hidden": 32,
                  "controlnet_layers": 5}
# Qwen/Qwen-Image vae/config.json (the Wan 2.1 VAE's per-channel statistics)
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]
# Qwen/Qwen-Image scheduler/scheduler_config.json
SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
             "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
             "time_shift_type": "exponential"}


def _qwen25vl_encoder(tokenizer, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hidden = TINY_QWENIMAGE["text_hidden"]
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 2048, "rope_theta": 1_000_000.0,
                     "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden},
        vocab_size=len(tokenizer), image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        vision_token_id=ids("<|vision_pad|>"), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwenimage_transformer(seed: int, latent_channels: int = 16):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * latent_channels, out_channels=latent_channels,  # latents packed 2x2
        num_layers=TINY_QWENIMAGE["num_layers"],
        attention_head_dim=TINY_QWENIMAGE["attention_head_dim"], num_attention_heads=TINY_QWENIMAGE["num_attention_heads"],
        joint_attention_dim=TINY_QWENIMAGE["text_hidden"], guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def tiny_qwenimage_vae(seed: int):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN,
                                  latents_std=LATENTS_STD)


def build_tiny_qwenimage(out_dir: str | os.PathLike, seed: int = 0, controlnet: bool = False,
                         vae: str | os.PathLike | None = None) -> Path:
    """Write a randomly initialised Qwen-Image-shaped pipeline to ``out_dir`` (and ``out_dir/controlnet``).
    ``vae``: a fitted ``AutoencoderKLQwenImage`` folder to use instead of the random 16-channel one."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageControlNetModel, QwenImagePipeline

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, "Qwen-Image")
    fitted_vae = load_fitted_vae(vae, "qwenimage") if vae is not None else None
    tokenizer = build_qwen_tokenizer()
    text_encoder = _qwen25vl_encoder(tokenizer, seed)
    transformer = tiny_qwenimage_transformer(seed + 1, fitted_vae.config.z_dim if fitted_vae else 16)
    vae = fitted_vae or tiny_qwenimage_vae(seed + 2)
    pipeline = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                                 text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)

    def make_controlnet():
        torch.manual_seed(seed + 3)
        config = transformer.config
        return QwenImageControlNetModel.from_transformer(
            transformer, num_layers=TINY_QWENIMAGE["controlnet_layers"], attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads)

    return _save(pipeline, out_dir, make_controlnet if controlnet else None)
