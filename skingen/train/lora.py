"""A LoRA on the frozen denoiser, trained with the ControlNet (``--unet_lora_rank``), with peft as diffusers uses it.

The adapter goes on the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) with
``lora_alpha = rank`` and gaussian initialisation, as diffusers' ``train_text_to_image_lora_sdxl.py``. Its weights
stay fp32 under mixed precision. Multi-process runs average its gradients across processes at each optimizer
step (the denoiser is not wrapped for distributed training). The adapter is part of each checkpoint
(accelerate's custom state) and is saved at the end in diffusers' LoRA format, which the pipelines'
``load_lora_weights`` and ``inference.py --lora`` read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(model: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    """Attach a rank-``rank`` LoRA to ``model``'s attention projections; returns its (fp32) trainable weights."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=list(LORA_TARGET_MODULES)))
    return lora_parameters(model)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter's weights, cast to fp32 (the base stays in its own dtype)."""
    parameters = [p for name, p in model.named_parameters() if "lora_" in name]
    for parameter in parameters:
        parameter.requires_grad_(True)
        parameter.data = parameter.data.float()
    return parameters


def average_gradients(accelerator, parameters: list[torch.nn.Parameter]) -> None:
    """Mean of each gradient over the processes (what DDP does for a wrapped model); no-op with one process."""
    if accelerator.num_processes == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")


class LoraState:
    """The adapter's weights as accelerate custom state, so checkpoints hold them and resuming restores them."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {key: value.detach().cpu().clone() for key, value in get_peft_model_state_dict(self.model).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA checkpoint has unexpected keys: {result.unexpected_keys[:3]}")


def diffusers_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under diffusers' key names (what ``save_lora_weights`` takes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def save_lora(write: Callable[[str], None], output_dir: str | os.PathLike) -> Path:
    """Run ``write(folder)`` (a pipeline class's ``save_lora_weights``) into a temporary folder and move the LoRA
    file into ``output_dir`` atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lora.", dir=output_dir) as tmp:
        write(tmp)
        os.replace(Path(tmp) / LORA_WEIGHT_NAME, output_dir / LORA_WEIGHT_NAME)
    return output_dir / LORA_WEIGHT_NAME
