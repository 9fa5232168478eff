"""Options of the large flow transformers (Z-Image 6 B, Qwen-Image 20 B) that decide whether a run fits an 80 GB
GPU: the frozen transformer held quantized (``--base_quantization``), the saved dtype, Adafactor, the validation
guidance; each family's trainer adds them with :func:`add_arguments`.

Quantization goes through diffusers' own ``quantization_config`` argument of ``from_pretrained``
(``BitsAndBytesConfig`` for int8/nf4, ``TorchAoConfig`` for fp8), so the transformer is quantized while it loads
and never exists in bf16 first. Both backends need CUDA; elsewhere the flag is a clear error before anything loads.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from ..errors import SkingenError

BASE_QUANTIZATIONS = ("int8", "nf4", "fp8")
BACKEND = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "fp8": "torchao"}


def add_arguments(parser: argparse.ArgumentParser, title: str, guidance_help: str) -> None:
    group = parser.add_argument_group(f"{title} memory and saving")
    group.add_argument("--base_quantization", choices=BASE_QUANTIZATIONS, default=None,
                       help="Hold the frozen transformer quantized while the ControlNet trains: int8 / nf4 "
                            "(bitsandbytes) or fp8 weight-only (torchao); CUDA only. Default: the mixed-precision "
                            "dtype (bf16 with --mixed_precision bf16).")
    group.add_argument("--guidance_scale", type=float, default=None, help=guidance_help)
    group.add_argument("--save_weight_dtype", choices=("fp16", "bf16", "fp32"), default="fp32",
                       help="Dtype of the saved ControlNet weights.")
    group.add_argument("--use_adafactor", action="store_true", help="Adafactor instead of AdamW (as diffusers' FLUX trainer).")


def validate_arguments(args: argparse.Namespace) -> None:
    """``--base_quantization`` needs CUDA and its backend; checked before anything loads."""
    name = getattr(args, "base_quantization", None)
    if name is None:
        return
    backend = BACKEND[name]
    if not torch.cuda.is_available():
        raise SkingenError(f"--base_quantization {name}: quantizing the frozen transformer needs a CUDA GPU "
                           f"({backend} kernels); on this machine drop the flag (the base is held in the "
                           "--mixed_precision dtype)")
    if importlib.util.find_spec(backend) is None:
        raise SkingenError(f"--base_quantization {name}: needs the {backend} package; pip install {backend} "
                           "(see requirements-gpu.txt)")


def quantization_kwargs(args: argparse.Namespace, compute_dtype: torch.dtype) -> dict:
    """``from_pretrained`` keyword arguments that load the transformer quantized (none without the flag)."""
    name = getattr(args, "base_quantization", None)
    if name is None:
        return {}
    from diffusers import BitsAndBytesConfig, TorchAoConfig

    if name == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    elif name == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    else:
        from torchao.quantization import Float8WeightOnlyConfig

        config = TorchAoConfig(Float8WeightOnlyConfig())
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}
