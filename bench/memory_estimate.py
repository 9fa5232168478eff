"""Parameter counts and training-memory estimates of SD3.5-medium and FLUX.1-dev ControlNets, without weights.

    python bench/memory_estimate.py

Every model is built on the meta device from the published configs (written out below), so the parameter counts
are exact for those configs; the memory figures are estimates from them: bytes per parameter for the frozen
weights, the trained ControlNet's fp32 master weights and gradients, and the optimizer states, per GPU, for the
options of configs/train/{sd35_medium,flux1_dev}_glyph_1024.yaml. Activations are not included (they need a GPU
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
    from diffusers import FluxControlNetModel, FluxTransformer2DModel, SD3ControlNetModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with init_empty_weights():
        sd3 = SD3Transformer2DModel(**SD35_MEDIUM)
        sd3_controlnet = SD3ControlNetModel.from_transformer(sd3, num_layers=12, num_extra_conditioning_channels=0,
                                                             load_weights_from_transformer=False)  # fmt: skip
        flux = FluxTransformer2DModel(**FLUX1_DEV)
        flux_controlnet = FluxControlNetModel.from_transformer(flux, num_layers=4, num_single_layers=4,
                                                               attention_head_dim=128, num_attention_heads=24,
                                                               load_weights_from_transformer=False)  # fmt: skip
        t5 = count(T5EncoderModel(T5Config(**T5_XXL)))
        clip_l = count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)))
        clip_l_plain = count(CLIPTextModel(CLIPTextConfig(**CLIP_L)))
        clip_g = count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))
    return {
        "sd35_medium": {"denoiser": count(sd3), "controlnet": count(sd3_controlnet), "text": clip_l + clip_g + t5},
        "flux1_dev": {"denoiser": count(flux), "controlnet": count(flux_controlnet), "text": clip_l_plain + t5},
    }


def estimate(counts: dict[str, int], *, adam_bytes: float, shards: int) -> dict[str, float]:
    """GiB per GPU: frozen denoiser in bf16, ControlNet fp32 weights, fp32 gradients and Adam states (both
    sharded over ``shards`` GPUs by ZeRO-2). Text encoders are not resident: captions are cached first and
    the encoders freed; the VAE (84M) is left out as small."""
    frozen = counts["denoiser"] * 2
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


if __name__ == "__main__":
    main()
