"""Qwen-Image: a Qwen2.5-VL text encoder, a 60-block dual-stream MMDiT (width 3072) on its own video VAE,
rectified-flow training; ControlNets copy a few transformer blocks (``QwenImageControlNetModel``).

Conventions read from diffusers' ``QwenImagePipeline`` / ``QwenImageControlNetPipeline`` (0.42.1), followed here:

- prompts: the pipeline's ``<|im_start|>system ...`` template, the last hidden state, the first 34 template tokens
  dropped, padded to the longest prompt with a mask (``None`` when nothing is padded). The cache stores them
  zero-padded to ``--max_sequence_length`` with the mask; encoding calls the pipeline's own ``encode_prompt``,
  and a batch is cut back to its longest prompt, as the pipeline's batch would be.
- the VAE takes 5-D ``(B, C, 1, H, W)`` input and normalises per channel: ``(z - latents_mean) / latents_std``;
  the frame axis is squeezed, so the loop, caches and losses see ``(B, C, h, w)`` as for the other families.
- latents and control latents are 2x2-packed into 64-channel tokens with ``img_shapes`` ``(1, h/2, w/2)``; the
  timestep is sigma itself and the output is the velocity (no negation).
- the sampler shifts sigmas by the image's token count (``use_dynamic_shifting``); training draws its noise level
  with the same shift at ``--resolution`` (``--timestep_shift resolution``, the default) or without it (``none``,
  as diffusers' Qwen-Image LoRA trainer).

A new ControlNet is ``QwenImageControlNetModel.from_transformer`` with ``--num_layers`` blocks (InstantX's union:
5); each of its block outputs is added to a run of ``ceil(60 / 5)`` consecutive base blocks.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import SkingenError
from . import large_transformer
from .base import VaeLatents, config_mismatches, posterior_mean_std
from .flow_matching import FlowMatchingBackbone
from .flux import pack_latents, unpack_latents

MAX_SEQUENCE_LENGTH = 1024  # QwenImagePipeline's tokenizer_max_length, and its check_inputs' limit


class QwenImageLatents(VaeLatents):
    """``AutoencoderKLQwenImage`` (a video VAE): one frame in ``(B, C, 1, H, W)``, squeezed again, so the caches,
    losses and loop see ``(B, C, h, w)``; per-channel normalisation ``(z - latents_mean) * (1 / latents_std)``,
    multiplied by the reciprocal as the pipeline does (bit-identical control latents)."""

    @property
    def scale_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    @property
    def channels(self) -> int:
        return self.vae.config.z_dim

    @torch.no_grad()
    def encode_parameters(self, pixels: torch.Tensor) -> torch.Tensor:
        frames = pixels.to(self.vae.device, self.vae.dtype).unsqueeze(2)
        return self.vae.encode(frames).latent_dist.parameters.squeeze(2)

    def _mean_inverse_std(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device)
        inverse_std = (1.0 / torch.tensor(config.latents_std).view(shape)).to(latents.device)
        return mean, inverse_std

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inverse_std = self._mean_inverse_std(latents)
        return (latents.float() - mean) * inverse_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inverse_std = self._mean_inverse_std(latents)
        frames = (latents.float() / inverse_std + mean).unsqueeze(2)
        return self.vae.decode(frames.to(self.vae.dtype)).sample[:, :, 0].float()


class QwenImageBackbone(FlowMatchingBackbone):
    family = "qwenimage"
    title = "Qwen-Image"
    pipeline_class_name = "QwenImageControlNetPipeline"
    base_pipeline_classes = ("QwenImagePipeline", "QwenImageControlNetPipeline")
    controlnet_class_name = "QwenImageControlNetModel"
    denoiser_subfolder = "transformer"
    text_subfolders = ("tokenizer", "text_encoder")
    default_tracker_project_name = "qwenimage_train_controlnet"
    default_max_sequence_length = MAX_SEQUENCE_LENGTH
    vae_class_name = "AutoencoderKLQwenImage"
    latent_space_class = QwenImageLatents
    ddp_find_unused_parameters = True  # the last ControlNet block's text stream feeds nothing (as in SD3)
    denoiser_class_name = "QwenImageTransformer2DModel"
    multi_controlnet_class_name = "QwenImageMultiControlNetModel"
    text_encoder_classes = (("text_encoder", "transformers.Qwen2_5_VLForConditionalGeneration"),)
    tiny_builder = "build_tiny_qwenimage"
    default_guidance_scale = 4.0  # true_cfg_scale, the pipeline's default
    guidance_argument = "true_cfg_scale"
    default_negative_prompt = " "  # diffusers' Qwen-Image examples; without one the pipeline does no CFG
    size_multiple = 16  # 8x VAE, 2x2 packing
    needs_negative_embeds = True
    tags = ("qwen-image",)
    license = "apache-2.0"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        group = parser.add_argument_group("Qwen-Image ControlNet")
        group.add_argument("--num_layers", type=int, default=5,
                           help="Transformer blocks the new ControlNet copies (InstantX's union: 5 of 60).")
        group.add_argument("--timestep_shift", choices=("resolution", "none"), default="resolution",
                           help="resolution: shift the training noise level by the token count at --resolution, as "
                                "the sampler does; none: unshifted (diffusers' Qwen-Image LoRA trainer).")
        large_transformer.add_arguments(parser, cls.title, "Validation true CFG scale (the pipeline's true_cfg_scale, "
                                                            "with the empty prompt as negative). Default 4.")

    @classmethod
    def validate_arguments(cls, args: argparse.Namespace) -> None:
        super().validate_arguments(args)
        if args.num_layers < 1:
            raise SkingenError(f"--num_layers must be at least 1, got {args.num_layers}")
        if args.max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise SkingenError(f"--max_sequence_length {args.max_sequence_length}: QwenImagePipeline takes at most "
                               f"{MAX_SEQUENCE_LENGTH} prompt tokens")
        large_transformer.validate_arguments(args)

    def load(self) -> None:
        from diffusers import QwenImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        self.tokenizers = [self.part("tokenizer", AutoTokenizer.from_pretrained, "tokenizer")]
        self.text_encoders = [self.part("Qwen2.5-VL text encoder", Qwen2_5_VLForConditionalGeneration.from_pretrained,
                                        "text_encoder", **self.text_encoder_kwargs)]
        quantized = large_transformer.quantization_kwargs(self.args, self.frozen_dtype)
        self.denoiser = self.part("transformer", QwenImageTransformer2DModel.from_pretrained, "transformer",
                                  variant=self.args.variant, torch_dtype=self.frozen_dtype, **quantized)
        self.denoiser_quantized = bool(quantized)
        self.load_scheduler()

    def resolution_multiple(self) -> tuple[int, str]:
        return self.vae_scale_factor * 2, f"VAE /{self.vae_scale_factor}, then 2x2 latent packing"

    @torch.no_grad()
    def control_latents(self, batch: dict, weight_dtype: torch.dtype, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
        """As ``QwenImageControlNetPipeline``: 5-D VAE encode, per-channel normalisation (not yet packed). The mode,
        as skingen's inference makes the pipeline use; with ``generator``, the pipeline's own posterior draw."""
        pixels = batch["conditioning_pixel_values"] * 2.0 - 1.0
        mean, std = posterior_mean_std(self.latent_space.encode_parameters(pixels))
        # The pipeline's draw (diffusers' DiagonalGaussianDistribution.sample): mean + std * randn(generator).
        latents = mean if generator is None else mean + std * torch.randn(mean.shape, generator=generator,
                                                                            device=mean.device, dtype=mean.dtype)
        return self.normalize_latents(latents).to(weight_dtype)

    # -- text -----------------------------------------------------------------------------------------------

    def text_settings(self):
        return {"max_sequence_length": self.args.max_sequence_length, "template": "qwenimage-t2i"}

    def token_limits(self):
        return [(self.tokenizers[0], self.args.max_sequence_length)]

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        from diffusers import QwenImagePipeline

        encoder = self.text_encoders[0]
        pipeline = QwenImagePipeline(scheduler=None, vae=None, text_encoder=encoder, tokenizer=self.tokenizers[0],
                                     transformer=None)
        length = self.args.max_sequence_length
        embeds, mask = pipeline.encode_prompt(list(captions), device=encoder.device, max_sequence_length=length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        padded = embeds.new_zeros(embeds.shape[0], length, embeds.shape[-1])
        padded[:, : embeds.shape[1]] = embeds
        full_mask = torch.zeros(embeds.shape[0], length, dtype=torch.long)
        full_mask[:, : embeds.shape[1]] = mask.long().cpu()
        return {"prompt_embeds": padded, "prompt_embeds_mask": full_mask}

    @staticmethod
    def batch_prompts(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cut cached prompts back to the batch's longest, as the pipeline's batch is; no mask when nothing is
        padded (the pipeline passes None then)."""
        longest = int(mask.sum(dim=1).max())
        embeds, mask = embeds[:, :longest], mask[:, :longest]
        return embeds, (None if bool(mask.all()) else mask)

    def prompt_kwargs(self, entry, device, dtype):
        # The pipeline drops an all-ones mask itself; given embeddings without one it warns.
        longest = int(entry["prompt_embeds_mask"].sum())
        return {"prompt_embeds": entry["prompt_embeds"][None, :longest].to(device, dtype),
                "prompt_embeds_mask": entry["prompt_embeds_mask"][None, :longest].to(device)}

    # -- the step -------------------------------------------------------------------------------------------

    def draw_timestep(self, generator: torch.Generator) -> torch.Tensor:
        timestep = super().draw_timestep(generator)
        config = self.noise_scheduler.config
        if self.args.timestep_shift == "none" or not config.use_dynamic_shifting:
            return timestep
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        tokens = (self.args.resolution // (self.vae_scale_factor * 2)) ** 2
        mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)
        sigma = (timestep / self.num_train_timesteps).clamp(1e-6, 1.0)
        shifted = self.noise_scheduler.time_shift(mu, 1.0, sigma)
        return shifted * self.num_train_timesteps

    def velocity(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: dict, control: torch.Tensor | None,
                 controlnet, weight_dtype: torch.dtype, denoiser=None) -> torch.Tensor:
        height, width = noisy.shape[-2:]
        embeds, mask = self.batch_prompts(prompts["prompt_embeds"].to(weight_dtype), prompts["prompt_embeds_mask"])
        common = {"hidden_states": pack_latents(noisy), "timestep": timesteps / self.num_train_timesteps,
                  "encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask,
                  "img_shapes": [(1, height // 2, width // 2)] * noisy.shape[0], "return_dict": False}
        samples = None  # without a ControlNet: the transformer alone
        if controlnet is not None:
            samples = [s.to(weight_dtype) for s in controlnet(controlnet_cond=pack_latents(control), **common)]
        velocity_tokens = (denoiser or self.denoiser)(controlnet_block_samples=samples, **common)[0]
        return unpack_latents(velocity_tokens, height, width)

    def pipeline_sigmas(self, num_steps: int) -> np.ndarray | None:
        return np.linspace(1.0, 1 / num_steps, num_steps)  # as QwenImageControlNetPipeline

    # -- the ControlNet -------------------------------------------------------------------------------------

    def new_controlnet(self):
        from diffusers import QwenImageControlNetModel

        config = self.denoiser.config
        layers = min(self.args.num_layers, config.num_layers)
        if config.num_layers % layers:
            # The base adds ControlNet block k to blocks [k * ceil(N / n), ...): some ControlNet blocks would go unused.
            step = math.ceil(config.num_layers / layers)
            used = math.ceil(config.num_layers / step)
            if used < layers:
                raise SkingenError(f"--num_layers {layers}: the transformer's {config.num_layers} blocks take ControlNet "
                                   f"outputs in runs of {step}, so only {used} would be used; pick a divisor of "
                                   f"{config.num_layers}")
        return QwenImageControlNetModel.from_transformer(
            self.denoiser, num_layers=layers, attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads)

    @classmethod
    def controlnet_mismatches(cls, controlnet_config: dict, denoiser_config) -> list[str]:
        return config_mismatches(controlnet_config, denoiser_config, [
            ("in_channels", "in_channels"), ("patch_size", "patch_size"), ("attention_head_dim", "attention_head_dim"),
            ("num_attention_heads", "num_attention_heads"), ("joint_attention_dim", "joint_attention_dim"),
            ("axes_dims_rope", "axes_dims_rope"),
        ])

    # -- generating -----------------------------------------------------------------------------------------

    def validation_pipeline(self, controlnet, scheduler=None):
        from diffusers import QwenImageControlNetPipeline

        return QwenImageControlNetPipeline(scheduler=scheduler or self.noise_scheduler, vae=self.vae, text_encoder=None,
                                           tokenizer=None, transformer=self.denoiser, controlnet=controlnet)
