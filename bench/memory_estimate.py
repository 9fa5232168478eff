"""Parameter counts and training-memory estimates of SD3.5-medium, FLUX.1-dev, Z-Image and Qwen-Image ControlNets,
without weights.

    python bench/memory_estimate.py

Every model is built on the meta device from the published configs (written out below), so the parameter counts
are exact for those configs; the memory figures are estimates from them: bytes per parameter for the frozen
weights, the trained ControlNet's fp32 master weights and gradients, and the optimizer states, per GPU, for the
options of configs/train/{sd35_medium,flux1_dev,zimage}_glyph_1024.yaml and qwenimage_glyph_1328.yaml; for Z-Image
and Qwen-Image also with the frozen transformer quantized (--base_quantization int8/fp8: 1 byte per parameter,
nf4: 0.5 plus a small per-block overhead left out). Activations are not included (they need a GPU
to measure; gradient checkpointing keeps them to a few GB at 1024 px and batch 1). Prints the markdown table of
docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 1024**3

# stabilityai/stable-diffusion-3.5-medium/transformer/config.json
SD35_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}  # fmt: skip
# black-forest-labs/FLUX.1-dev/transformer/config.json
FLUX1_DEV = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
# Tongyi-MAI/Z-Image-Turbo/transformer/config.json
ZIMAGE = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 2560,
    "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
}  # fmt: skip
# Qwen/Qwen-Image/transformer/config.json
QWENIMAGE = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
# Qwen3-4B (Z-Image's text_encoder) and Qwen2.5-VL-7B's language model (Qwen-Image's; its 0.7 B vision tower unused)
QWEN3_4B = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}
QWEN25_7B = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu"}  # fmt: skip
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768}  # fmt: skip
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280}  # fmt: skip


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts() -> dict[str, dict[str, int]]:
    from accelerate import init_empty_weights
    from diffusers import (
        FluxControlNetModel,
        FluxTransformer2DModel,
        QwenImageControlNetModel,
        QwenImageTransformer2DModel,
        SD3ControlNetModel,
        SD3Transformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        Qwen2Config,
        Qwen2Model,
        Qwen3Config,
        Qwen3Model,
        T5Config,
        T5EncoderModel,
    )

    with init_empty_weights():
        sd3 = SD3Transformer2DModel(**SD35_MEDIUM)
        sd3_controlnet = SD3ControlNetModel.from_transformer(sd3, num_layers=12, num_extra_conditioning_channels=0,
                                                             load_weights_from_transformer=False)  # fmt: skip
        flux = FluxTransformer2DModel(**FLUX1_DEV)
        flux_controlnet = FluxControlNetModel.from_transformer(flux, num_layers=4, num_single_layers=4,
                                                               attention_head_dim=128, num_attention_heads=24,
                                                               load_weights_from_transformer=False)  # fmt: skip
        zimage, zimage_controlnet = zimage_models()
        qwen = QwenImageTransformer2DModel(**QWENIMAGE)
        qwen_controlnet = QwenImageControlNetModel.from_transformer(qwen, num_layers=5, attention_head_dim=128,
                                                                    num_attention_heads=24,
                                                                    load_weights_from_transformer=False)  # fmt: skip
        qwen3 = count(Qwen3Model(Qwen3Config(**QWEN3_4B)))
        qwen25 = count(Qwen2Model(Qwen2Config(**QWEN25_7B)))
        t5 = count(T5EncoderModel(T5Config(**T5_XXL)))
        clip_l = count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)))
        clip_l_plain = count(CLIPTextModel(CLIPTextConfig(**CLIP_L)))
        clip_g = count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))
    return {
        "sd35_medium": {"denoiser": count(sd3), "controlnet": count(sd3_controlnet), "text": clip_l + clip_g + t5},
        "flux1_dev": {"denoiser": count(flux), "controlnet": count(flux_controlnet), "text": clip_l_plain + t5},
        "zimage": {"denoiser": count(zimage), "controlnet": count(zimage_controlnet), "text": qwen3},
        "qwenimage": {"denoiser": count(qwen), "controlnet": count(qwen_controlnet), "text": qwen25},
    }


def zimage_models():
    """Z-Image's transformer and the Fun ControlNet Union's layout (control at 0, 5, ..., 25 + 2 refiner blocks)."""
    from diffusers import ZImageTransformer2DModel

    from skingen.backbones.zimage import new_zimage_controlnet

    transformer = ZImageTransformer2DModel(**ZIMAGE)
    return transformer, new_zimage_controlnet(transformer)


FROZEN_BYTES = {"bf16": 2, "int8": 1, "fp8": 1, "nf4": 0.5}


def estimate(counts: dict[str, int], *, adam_bytes: float, shards: int, base: str = "bf16") -> dict[str, float]:
    """GiB per GPU: frozen denoiser in bf16, ControlNet fp32 weights, fp32 gradients and Adam states (both
    sharded over ``shards`` GPUs by ZeRO-2). Text encoders are not resident: captions are cached first and
    the encoders freed; the VAE (84M) is left out as small."""
    frozen = counts["denoiser"] * FROZEN_BYTES[base]
    trained = counts["controlnet"] * 4
    grads = counts["controlnet"] * 4 / shards
    optimizer = counts["controlnet"] * adam_bytes / shards
    return {"frozen": frozen / GIB, "weights": trained / GIB, "grads": grads / GIB, "adam": optimizer / GIB,
            "total": (frozen + trained + grads + optimizer) / GIB}  # fmt: skip


def main() -> None:
    counts = parameter_counts()
    options = [
        ("1 GPU, AdamW fp32 states", 8, 1),
        ("1 GPU, 8-bit Adam", 2, 1),
        ("8 GPUs ZeRO-2, AdamW fp32 states", 8, 8),
    ]
    print("| model | denoiser (frozen) | ControlNet (trained) | text encoders (cached, freed) |")
    print("|---|---|---|---|")
    for name, c in counts.items():
        print(f"| {name} | {c['denoiser'] / 1e9:.2f} B | {c['controlnet'] / 1e9:.2f} B | {c['text'] / 1e9:.2f} B |")
    print()
    print("| model | option | frozen bf16 | ControlNet fp32 | grads | Adam states | total GiB/GPU (no activations) |")
    print("|---|---|---|---|---|---|---|")
    for name, c in counts.items():
        for label, adam_bytes, shards in options:
            e = estimate(c, adam_bytes=adam_bytes, shards=shards)
            print(f"| {name} | {label} | {e['frozen']:.1f} | {e['weights']:.1f} | {e['grads']:.1f} | {e['adam']:.1f} "
                  f"| {e['total']:.1f} |")  # fmt: skip
    print()
    print("| model | 1 GPU, 8-bit Adam, frozen base held as | frozen | total GiB/GPU (no activations) |")
    print("|---|---|---|---|")
    for name in ("zimage", "qwenimage"):
        for base in FROZEN_BYTES:
            e = estimate(counts[name], adam_bytes=2, shards=1, base=base)
            print(f"| {name} | {base} (--base_quantization {base if base != 'bf16' else 'not set'}) | {e['frozen']:.1f} "
                  f"| {e['total']:.1f} |")


if __name__ == "__main__":
    main()
