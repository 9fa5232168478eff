"""FLUX.1: CLIP-L (pooled) + T5 text encoders, a double/single-stream transformer on 2x2-packed latents,
rectified-flow training.

As diffusers' ``examples/controlnet/train_controlnet_flux.py``: the cache stores T5's ``--max_sequence_length``
hidden states and CLIP's pooled output; latents and the VAE-encoded conditioning image are packed 2x2 into
tokens with 3-axis image ids (text ids are zeros); guidance-distilled models (FLUX.1-dev) get
``--guidance_scale`` as their guidance input; the ControlNet is ``FluxControlNetModel.from_transformer`` with
``--num_double_layers``/``--num_single_layers``. The prediction is unpacked again, so losses see ``(B, C, h, w)``.
Generation uses ``FluxControlNetPipeline``.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import SkingenError
from .base import config_mismatches
from .flow_matching import FlowMatchingBackbone

logger = logging.getLogger(__name__)
# diffusers' FluxControlNetModel still builds its position embedding through a deprecated import path; the notice
# is about diffusers' own code, not anything a user can change.
warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: each 2x2 patch becomes one token (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """``(h/2 * w/2, 3)`` positions of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(FlowMatchingBackbone):
    family = "flux"
    title = "FLUX.1"
    pipeline_class_name = "FluxControlNetPipeline"
    base_pipeline_classes = ("FluxPipeline", "FluxControlNetPipeline")
    controlnet_class_name = "FluxControlNetModel"
    denoiser_subfolder = "transformer"
    text_subfolders = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    default_tracker_project_name = "flux_train_controlnet"
    denoiser_class_name = "FluxTransformer2DModel"
    multi_controlnet_class_name = "FluxMultiControlNetModel"
    text_encoder_classes = (("text_encoder", "transformers.CLIPTextModel"),
                            ("text_encoder_2", "transformers.T5EncoderModel"))
    tiny_builder = "build_tiny_flux"
    default_guidance_scale = 3.5  # FLUX.1-dev's distilled guidance (an input of the transformer, not CFG)
    size_multiple = 16  # 8x VAE, 2x2 packing
    negative_prompt = False
    tags = ("flux",)  # FLUX.1-dev: FLUX.1 [dev] Non-Commercial License
    default_max_sequence_length = 512

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        group = parser.add_argument_group("FLUX")
        group.add_argument("--num_double_layers", type=int, default=4,
                           help="Double-stream blocks the new ControlNet copies from the transformer.")
        group.add_argument("--num_single_layers", type=int, default=4,
                           help="Single-stream blocks the new ControlNet copies from the transformer.")
        group.add_argument("--guidance_scale", type=float, default=3.5,
                           help="Guidance input of a guidance-distilled transformer (FLUX.1-dev) during training.")
        group.add_argument("--save_weight_dtype", choices=("fp16", "bf16", "fp32"), default="fp32",
                           help="Dtype of the saved ControlNet weights.")
        group.add_argument("--use_adafactor", action="store_true", help="Adafactor instead of AdamW (as diffusers).")
        group.add_argument("--jsonl_for_train", type=str, default=None,
                           help="diffusers' form of --train_data_dir: a jsonl of rows (image, conditioning_image, "
                                "text; --image_column etc. rename them) whose image paths are absolute or relative "
                                "to the file's folder.")
        group.add_argument("--enable_model_cpu_offload", action="store_true",
                           help="Accepted for diffusers' command lines (validation keeps the models where training "
                                "has them).")

    @classmethod
    def validate_arguments(cls, args: argparse.Namespace) -> None:
        super().validate_arguments(args)
        for name in ("num_double_layers", "num_single_layers"):
            if getattr(args, name) < 0:
                raise SkingenError(f"--{name} must not be negative, got {getattr(args, name)}")

    @classmethod
    def normalize_arguments(cls, args: argparse.Namespace) -> None:
        if args.jsonl_for_train is None:
            return
        path = Path(args.jsonl_for_train).expanduser()
        if args.train_data_dir is not None or args.dataset_name is not None:
            raise SkingenError("give --jsonl_for_train or --train_data_dir/--dataset_name, not both")
        if not path.is_file() or path.suffix != ".jsonl":
            raise SkingenError(f"--jsonl_for_train {path}: not a .jsonl file; give a jsonl of rows (image, "
                               "conditioning_image, text) or pass a dataset folder as --train_data_dir")
        args.train_data_dir = str(path)

    def load(self) -> None:
        from diffusers import FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        variant = self.args.variant
        self.tokenizers = [self.part(f"tokenizer {name}", AutoTokenizer.from_pretrained, name)
                           for name in ("tokenizer", "tokenizer_2")]
        self.text_encoders = [
            self.part("CLIP text encoder", CLIPTextModel.from_pretrained, "text_encoder", **self.text_encoder_kwargs),
            self.part("T5 text encoder", T5EncoderModel.from_pretrained, "text_encoder_2", **self.text_encoder_kwargs),
        ]
        self.denoiser = self.part("transformer", FluxTransformer2DModel.from_pretrained, "transformer", variant=variant,
                                  torch_dtype=self.frozen_dtype)
        self.load_scheduler()

    def resolution_multiple(self) -> tuple[int, str]:
        return self.vae_scale_factor * 2, f"VAE /{self.vae_scale_factor}, then 2x2 latent packing"

    # -- text -----------------------------------------------------------------------------------------------

    def text_settings(self):
        return {"max_sequence_length": self.args.max_sequence_length}

    def token_limits(self):
        return [(self.tokenizers[0], self.tokenizers[0].model_max_length), (self.tokenizers[1], self.args.max_sequence_length)]

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        captions = list(captions)
        clip_tokenizer, clip = self.tokenizers[0], self.text_encoders[0]
        ids = clip_tokenizer(captions, padding="max_length", max_length=clip_tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
        t5_tokenizer, t5 = self.tokenizers[1], self.text_encoders[1]
        ids = t5_tokenizer(captions, padding="max_length", max_length=self.args.max_sequence_length, truncation=True,
                           return_tensors="pt").input_ids
        return {"prompt_embeds": t5(ids.to(t5.device), output_hidden_states=False)[0], "pooled_prompt_embeds": pooled}

    # -- the step -------------------------------------------------------------------------------------------

    def velocity(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: dict, control: torch.Tensor | None,
                 controlnet, weight_dtype: torch.dtype, denoiser=None) -> torch.Tensor:
        height, width = noisy.shape[-2:]
        prompt_embeds = prompts["prompt_embeds"].to(weight_dtype)
        pooled = prompts["pooled_prompt_embeds"].to(weight_dtype)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=noisy.device, dtype=weight_dtype)
        image_ids = latent_image_ids(height, width, noisy.device, weight_dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((noisy.shape[0],), self.args.guidance_scale, device=noisy.device, dtype=weight_dtype)
        common = {"hidden_states": pack_latents(noisy), "timestep": timesteps / self.num_train_timesteps,
                  "guidance": guidance, "pooled_projections": pooled, "encoder_hidden_states": prompt_embeds,
                  "txt_ids": text_ids, "img_ids": image_ids, "return_dict": False}
        double = single = None  # without a ControlNet: the transformer alone
        if controlnet is not None:
            double, single = controlnet(controlnet_cond=pack_latents(control), **common)
        velocity_tokens = (denoiser or self.denoiser)(
            controlnet_block_samples=None if double is None else [s.to(weight_dtype) for s in double],
            controlnet_single_block_samples=None if single is None else [s.to(weight_dtype) for s in single],
            **common)[0]
        return unpack_latents(velocity_tokens, height, width)

    def pipeline_sigmas(self, num_steps: int) -> np.ndarray | None:
        return np.linspace(1.0, 1 / num_steps, num_steps)  # as FluxControlNetPipeline

    # -- the ControlNet -------------------------------------------------------------------------------------

    def new_controlnet(self):
        from diffusers import FluxControlNetModel

        config = self.denoiser.config
        # More blocks than the transformer has would only add outputs it never reads (and random weights).
        double = min(self.args.num_double_layers, config.num_layers)
        single = min(self.args.num_single_layers, config.num_single_layers)
        if (double, single) != (self.args.num_double_layers, self.args.num_single_layers):
            logger.warning(f"the transformer has {config.num_layers} double- and {config.num_single_layers} "
                           f"single-stream blocks; the new ControlNet copies {double} and {single}")
        return FluxControlNetModel.from_transformer(
            self.denoiser, num_layers=double, num_single_layers=single,
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads)

    @classmethod
    def controlnet_mismatches(cls, controlnet_config: dict, denoiser_config) -> list[str]:
        return config_mismatches(controlnet_config, denoiser_config, [
            ("in_channels", "in_channels"), ("attention_head_dim", "attention_head_dim"),
            ("num_attention_heads", "num_attention_heads"), ("joint_attention_dim", "joint_attention_dim"),
            ("pooled_projection_dim", "pooled_projection_dim"), ("guidance_embeds", "guidance_embeds"),
            ("axes_dims_rope", "axes_dims_rope"),
        ])

    # -- generating -----------------------------------------------------------------------------------------

    def validation_pipeline(self, controlnet, scheduler=None):
        from diffusers import FluxControlNetPipeline

        return FluxControlNetPipeline(
            scheduler=scheduler or self.noise_scheduler, vae=self.vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, transformer=self.denoiser, controlnet=controlnet)
