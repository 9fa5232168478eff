"""Peak GPU memory and step time of ControlNet training for every family, from the published configs (no weights).

    python bench/gpu_check.py                       # CUDA: real sizes at 1024 px, every memory option (< 10 min on an H100)
    python bench/gpu_check.py --tiny                # CPU: tiny configs at 64 px, the options a CPU has (what the tests run)
    python bench/gpu_check.py --families zimage qwenimage --out gpu_check.json

For SDXL, SD3.5-medium, FLUX.1-dev, Z-Image and Qwen-Image it builds the denoiser and a new ControlNet as the trainers
make it (SDXL: ``ControlNetModel.from_unet``; SD3: 12 blocks; FLUX: 4 + 4 blocks; Z-Image: the Fun ControlNet Union
layout; Qwen-Image: 5 blocks) with random weights, then times training steps at batch 1: the frozen denoiser in
bf16 (or quantized), the ControlNet in fp32 under bf16 autocast, random cached-latent-shaped inputs and text
embeddings of the real widths, the ControlNet + denoiser forward, an MSE loss, backward and an optimizer step; the
VAE and text encoders are left out (captions and latents are cached before training). Options:

- ``diffusers_example`` (SDXL only): the settings of diffusers' examples/controlnet/train_controlnet_sdxl.py by
  default (UNet in the weight dtype, fp32 ControlNet, AdamW, no checkpointing), the baseline users know;
- ``bf16``: AdamW, no checkpointing; ``gc``: + gradient checkpointing; ``gc_adam8bit``: + 8-bit Adam (bitsandbytes);
- ``gc_adam8bit_int8`` / ``_fp8`` (Z-Image, Qwen-Image): + the frozen transformer quantized weight-only in place by
  torchao (the trainer's --base_quantization quantizes while loading; the memory is the same).

Options that need CUDA libraries are reported as skipped on a CPU. Prints a markdown table (and writes JSON with
--out): peak memory allocated (GiB) and mean step time after one warm-up step, with the device named.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_estimate import FLUX1_DEV, QWENIMAGE, SD35_MEDIUM, ZIMAGE  # noqa: E402

from skingen.errors import SkingenError, run_cli  # noqa: E402

FAMILIES = ("sdxl", "sd3", "flux", "zimage", "qwenimage")
OPTIONS = ("diffusers_example", "bf16", "gc", "gc_adam8bit", "gc_adam8bit_int8", "gc_adam8bit_fp8")
# stabilityai/stable-diffusion-xl-base-1.0/unet/config.json (the keys that differ from UNet2DConditionModel's defaults)
SDXL_UNET = {
    "sample_size": 128, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "block_out_channels": (320, 640, 1280),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}  # fmt: skip
TINY = {
    "sdxl": {"sample_size": 8, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "block_out_channels": (32, 64),
             "transformer_layers_per_block": (1, 1), "attention_head_dim": (2, 4), "cross_attention_dim": 32,
             "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 80, "layers_per_block": 1, "norm_num_groups": 16},
    "sd3": {**SD35_MEDIUM, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
            "caption_projection_dim": 16, "pooled_projection_dim": 16, "pos_embed_max_size": 16,
            "dual_attention_layers": (0,), "sample_size": 8},
    "flux": {**FLUX1_DEV, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
             "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": (4, 6, 6)},
    "zimage": {**ZIMAGE, "dim": 32, "n_layers": 6, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 32,
               "axes_dims": [8, 4, 4]},
    "qwenimage": {**QWENIMAGE, "num_layers": 10, "attention_head_dim": 16, "num_attention_heads": 2,
                  "joint_attention_dim": 32, "axes_dims_rope": (8, 4, 4)},
}  # fmt: skip


class Case:
    """One family's denoiser + new ControlNet and a function running one forward pass on random inputs."""

    def __init__(self, family: str, tiny: bool, resolution: int, device: torch.device):
        self.family, self.device = family, device
        self.latent = resolution // 8
        self.denoiser, self.controlnet, self.inputs = BUILDERS[family](TINY[family] if tiny else None, self.latent,
                                                                       device)

    def loss(self) -> torch.Tensor:
        prediction = self.inputs(self.denoiser, self.controlnet)
        return prediction.float().pow(2).mean()


def _sdxl(config, latent, device):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel(**(config or SDXL_UNET))
    controlnet = ControlNetModel.from_unet(unet)
    width, pooled = unet.config.cross_attention_dim, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    text = torch.randn(1, 77, width, device=device)
    added = {"text_embeds": torch.randn(1, pooled, device=device), "time_ids": torch.randn(1, 6, device=device)}
    noisy, cond = torch.randn(1, 4, latent, latent, device=device), torch.rand(1, 3, latent * 8, latent * 8, device=device)
    t = torch.tensor([500], device=device)

    def run(unet, controlnet):
        down, mid = controlnet(noisy, t, encoder_hidden_states=text, added_cond_kwargs=added, controlnet_cond=cond,
                               return_dict=False)
        return unet(noisy, t, encoder_hidden_states=text, added_cond_kwargs=added, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False)[0]

    return unet, controlnet, run


def _sd3(config, latent, device):
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    transformer = SD3Transformer2DModel(**(config or SD35_MEDIUM))
    controlnet = SD3ControlNetModel.from_transformer(transformer, num_layers=min(12, transformer.config.num_layers - 1),
                                                     num_extra_conditioning_channels=0)
    c = transformer.config
    noisy, cond = (torch.randn(1, 16, latent, latent, device=device) for _ in range(2))
    text, pooled = torch.randn(1, 333, c.joint_attention_dim, device=device), torch.randn(1, c.pooled_projection_dim, device=device)
    t = torch.tensor([500.0], device=device)

    def run(transformer, controlnet):
        blocks = controlnet(hidden_states=noisy, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
                            controlnet_cond=cond, return_dict=False)[0]
        return transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
                           block_controlnet_hidden_states=blocks, return_dict=False)[0]

    return transformer, controlnet, run


def _flux(config, latent, device):
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    from skingen.backbones.flux import latent_image_ids

    transformer = FluxTransformer2DModel(**(config or FLUX1_DEV))
    c = transformer.config
    controlnet = FluxControlNetModel.from_transformer(transformer, num_layers=min(4, c.num_layers),
                                                      num_single_layers=min(4, c.num_single_layers),
                                                      attention_head_dim=c.attention_head_dim,
                                                      num_attention_heads=c.num_attention_heads)
    tokens = (latent // 2) ** 2
    common = {"hidden_states": torch.randn(1, tokens, 64, device=device), "timestep": torch.tensor([0.5], device=device),
              "guidance": torch.tensor([3.5], device=device),
              "pooled_projections": torch.randn(1, c.pooled_projection_dim, device=device),
              "encoder_hidden_states": torch.randn(1, 512, c.joint_attention_dim, device=device),
              "txt_ids": torch.zeros(512, 3, device=device), "img_ids": latent_image_ids(latent, latent, device, torch.float32),
              "return_dict": False}  # fmt: skip
    cond = torch.randn(1, tokens, 64, device=device)

    def run(transformer, controlnet):
        double, single = controlnet(controlnet_cond=cond, **common)
        return transformer(controlnet_block_samples=double, controlnet_single_block_samples=single, **common)[0]

    return transformer, controlnet, run


def _zimage(config, latent, device):
    from diffusers import ZImageTransformer2DModel

    from skingen.backbones.zimage import borrow_transformer_modules, new_zimage_controlnet

    transformer = ZImageTransformer2DModel(**(config or ZIMAGE))
    controlnet = new_zimage_controlnet(transformer)
    frames = [torch.randn(16, 1, latent, latent, device=device)]
    captions = [torch.randn(128, transformer.config.cap_feat_dim, device=device)]
    control, t = torch.randn(1, 16, 1, latent, latent, device=device), torch.tensor([0.5], device=device)

    def run(transformer, controlnet):
        borrow_transformer_modules(controlnet, transformer)
        hints = controlnet(frames, t, captions, control)
        return torch.stack(transformer(frames, t, captions, controlnet_block_samples=hints, return_dict=False)[0])

    return transformer, controlnet, run


def _qwenimage(config, latent, device):
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(**(config or QWENIMAGE))
    c = transformer.config
    controlnet = QwenImageControlNetModel.from_transformer(transformer, num_layers=5, attention_head_dim=c.attention_head_dim,
                                                           num_attention_heads=c.num_attention_heads)
    tokens = (latent // 2) ** 2
    common = {"hidden_states": torch.randn(1, tokens, 64, device=device), "timestep": torch.tensor([0.5], device=device),
              "encoder_hidden_states": torch.randn(1, 128, c.joint_attention_dim, device=device),
              "encoder_hidden_states_mask": None, "img_shapes": [(1, latent // 2, latent // 2)], "return_dict": False}
    cond = torch.randn(1, tokens, 64, device=device)

    def run(transformer, controlnet):
        samples = controlnet(controlnet_cond=cond, **common)
        return transformer(controlnet_block_samples=samples, **common)[0]

    return transformer, controlnet, run


BUILDERS: dict[str, Callable] = {"sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "zimage": _zimage, "qwenimage": _qwenimage}


def applies(family: str, option: str) -> bool:
    if option == "diffusers_example":
        return family == "sdxl"
    if option.endswith(("_int8", "_fp8")):
        return family in ("zimage", "qwenimage")
    return True


def unavailable(option: str, device: torch.device) -> str | None:
    """Why ``option`` cannot run here (None when it can)."""
    import importlib.util

    if "adam8bit" in option and (device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None):
        return "needs CUDA and bitsandbytes"
    if option.endswith(("_int8", "_fp8")) and (device.type != "cuda" or importlib.util.find_spec("torchao") is None):
        return "needs CUDA and torchao"
    return None


def quantize(model, option: str) -> None:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig() if option.endswith("_int8") else Float8WeightOnlyConfig())


def measure(family: str, option: str, *, tiny: bool, resolution: int, steps: int, device: torch.device) -> dict:
    """Peak memory (GiB, CUDA only) and mean seconds per step after one warm-up step."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    case = Case(family, tiny, resolution, device)
    case.denoiser.requires_grad_(False)
    case.denoiser.to(device, dtype=torch.bfloat16)  # the frozen base in the weight dtype
    case.controlnet.to(device, dtype=torch.float32)
    if option.endswith(("_int8", "_fp8")):
        quantize(case.denoiser, option)
    if option.startswith("gc"):
        if family == "zimage":
            case.controlnet.gradient_checkpointing = False  # diffusers' class never sets it
        case.controlnet.enable_gradient_checkpointing()
        case.denoiser.enable_gradient_checkpointing()
    params = [p for p in case.controlnet.parameters() if p.requires_grad]
    if "adam8bit" in option:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(params, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = case.loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
    result = {"family": family, "option": option, "peak_gib": peak, "step_s": sum(times[1:]) / steps,
              "loss_finite": bool(torch.isfinite(loss).item())}
    del case, optimizer
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs at 64 px on the CPU (what the tests run)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--options", nargs="+", choices=OPTIONS, default=list(OPTIONS))
    parser.add_argument("--resolution", type=int, default=None, help="pixels a side (default 1024; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # per-model cast notices, not results
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        raise SkingenError("bench/gpu_check.py builds real-size models (up to 20 B parameters): it needs a CUDA GPU; "
                           "run it with --tiny on a CPU")
    resolution = args.resolution or (64 if args.tiny else 1024)
    if resolution % 16:
        raise SkingenError(f"--resolution {resolution}: must be a multiple of 16 (VAE /8, then 2x2 patches)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = []
    print(f"device: {name}; {'tiny configs' if args.tiny else 'published configs'}, {resolution} px, batch 1")
    print("| family | option | peak GiB | s/step |")
    print("|---|---|---|---|")
    for family in args.families:
        for option in args.options:
            if not applies(family, option):
                continue
            reason = unavailable(option, device)
            if reason:
                results.append({"family": family, "option": option, "skipped": reason})
                print(f"| {family} | {option} | skipped: {reason} | |")
                continue
            row = measure(family, option, tiny=args.tiny, resolution=resolution, steps=args.steps, device=device)
            results.append(row)
            peak = "n/a (CPU)" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
            print(f"| {family} | {option} | {peak} | {row['step_s']:.3f} |", flush=True)
    if args.out:
        from skingen.fileio import atomic_write_json

        atomic_write_json(Path(args.out), {"device": name, "resolution": resolution, "tiny": args.tiny,
                                           "results": results})
    return results


if __name__ == "__main__":
    run_cli(main)
