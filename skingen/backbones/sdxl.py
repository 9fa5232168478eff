"""SDXL: two CLIP text encoders, a UNet with text_time conditioning, DDPM epsilon/v-prediction training.

As diffusers' ``examples/controlnet/train_controlnet_sdxl.py``: the cache stores both encoders' penultimate
hidden states (concatenated) and the second encoder's projected pooled output; each sample carries SDXL's six
micro-conditioning time ids; the noise level is a DDPM timestep; the ControlNet is ``ControlNetModel.from_unet``;
generation uses ``StableDiffusionXLControlNetPipeline``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SkingenError
from ..train.lora import diffusers_lora_state, save_lora
from ..train.loss_weighting import (
    TIMESTEP_BIAS_STRATEGIES,
    TimestepBias,
    min_snr_weights,
    offset_noise,
    perturbed_noise,
)
from .base import Backbone, DenoiserOutput, check_controlnet_source, config_mismatches, load_part, resolve_model_source

# Samplers of the DDPM-trained SDXL (names users know from SDXL front-ends -> diffusers classes).
DDPM_SCHEDULERS = {
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}


@dataclass
class SDXLComponents:
    """What SDXL ControlNet training and generation need from a base pipeline."""

    tokenizer_one: Any
    tokenizer_two: Any
    text_encoder_one: Any
    text_encoder_two: Any
    vae: Any
    unet: Any
    noise_scheduler: Any

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer_one, self.tokenizer_two]

    @property
    def text_encoders(self) -> list:
        return [self.text_encoder_one, self.text_encoder_two]


class SDXLBackbone(Backbone):
    family = "sdxl"
    title = "SDXL"
    pipeline_class_name = "StableDiffusionXLControlNetPipeline"
    base_pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline",
                             "StableDiffusionXLImg2ImgPipeline")
    controlnet_class_name = "ControlNetModel"
    denoiser_subfolder = "unet"
    text_subfolders = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    default_tracker_project_name = "sd_xl_train_controlnet"
    denoiser_class_name = "UNet2DConditionModel"
    multi_controlnet_class_name = "MultiControlNetModel"
    text_encoder_classes = (("text_encoder", "transformers.CLIPTextModel"),
                            ("text_encoder_2", "transformers.CLIPTextModelWithProjection"))
    tiny_builder = "build_tiny_sdxl"
    schedulers = DDPM_SCHEDULERS
    default_scheduler = "unipc"
    control_image_argument = "image"
    cuda_dtype = "fp16"
    tags = ("stable-diffusion-xl",)
    license = "openrail++"
    pipeline_kwargs = {"add_watermarker": False}  # the invisible watermark changes pixels; outputs are research data

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("SDXL timestep sampling (diffusers' train_text_to_image_sdxl.py flags)")
        group.add_argument("--timestep_bias_strategy", choices=TIMESTEP_BIAS_STRATEGIES, default="none",
                           help="Draw training timesteps more often from the later (noisier: layout) or earlier "
                                "(detail) part of the schedule, or from a range; none: uniform.")
        group.add_argument("--timestep_bias_multiplier", type=float, default=1.0,
                           help="How much more often the biased timesteps are drawn (2.0: twice; 1.0: no bias).")
        group.add_argument("--timestep_bias_portion", type=float, default=0.25,
                           help="The share of the schedule biased by the earlier/later strategies.")
        group.add_argument("--timestep_bias_begin", type=int, default=0, help="range strategy: first timestep.")
        group.add_argument("--timestep_bias_end", type=int, default=1000, help="range strategy: end (exclusive).")

    @classmethod
    def validate_arguments(cls, args: argparse.Namespace) -> None:
        TimestepBias.from_args(args).check()

    def load(self) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        variant = self.args.variant
        self.tokenizers = [self.part("first tokenizer", AutoTokenizer.from_pretrained, "tokenizer"),
                           self.part("second tokenizer", AutoTokenizer.from_pretrained, "tokenizer_2")]
        self.text_encoders = [
            self.part("first text encoder", CLIPTextModel.from_pretrained, "text_encoder", **self.text_encoder_kwargs),
            self.part("second text encoder", CLIPTextModelWithProjection.from_pretrained, "text_encoder_2",
                      **self.text_encoder_kwargs),
        ]
        self.denoiser = self.part("UNet", UNet2DConditionModel.from_pretrained, "unet", variant=variant)
        self.noise_scheduler = self.part("noise scheduler", DDPMScheduler.from_pretrained, "scheduler")
        # None: uniform draws (torch.randint, as without the flags); computed once, not per sample.
        self.timestep_weights = TimestepBias.from_args(self.args).weights(self.num_train_timesteps)
        if getattr(self.denoiser.config, "addition_embed_type", None) != "text_time":
            raise SkingenError(f"{self.source}/unet: addition_embed_type is {self.denoiser.config.addition_embed_type!r}, "
                               "not 'text_time'; this is not an SDXL UNet (SD 1.x/2.x pipelines are not supported)")
        crop = (self.args.crops_coords_top_left_h, self.args.crops_coords_top_left_w)
        self.fixed_crop = None if crop == (None, None) else tuple(v or 0 for v in crop)

    @property
    def unet(self):
        return self.denoiser

    def resolution_multiple(self) -> tuple[int, str]:
        halvings = len(self.denoiser.config.block_out_channels) - 1
        return (self.vae_scale_factor * 2**halvings,
                f"VAE /{self.vae_scale_factor}, then the UNet halves the latents {halvings} times")

    # -- text -----------------------------------------------------------------------------------------------

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        prompt_embeds, pooled = encode_prompt(captions, self.tokenizers, self.text_encoders)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def token_limits(self):
        return [(tokenizer, tokenizer.model_max_length) for tokenizer in self.tokenizers[:1]]  # both tokenize alike

    # -- per sample -----------------------------------------------------------------------------------------

    def sample_conditioning(self, original_size, crop_top_left, target_size) -> dict[str, torch.Tensor]:
        return {"time_ids": compute_time_ids(original_size, self.fixed_crop or crop_top_left, target_size)}

    def draw_timestep(self, generator: torch.Generator) -> torch.Tensor:
        if self.timestep_weights is None:
            return torch.randint(0, self.num_train_timesteps, (), generator=generator)
        return torch.multinomial(self.timestep_weights, 1, generator=generator)[0]

    # -- the step -------------------------------------------------------------------------------------------

    def forward(self, batch: dict, controlnet, weight_dtype: torch.dtype, denoiser=None) -> DenoiserOutput:
        scheduler = self.noise_scheduler
        latents = self.clean_latents(batch, weight_dtype)
        options = self.loss_options
        noise = offset_noise(batch["noise"].to(weight_dtype), batch.get("offset_noise"), options.noise_offset)
        timesteps = batch["timesteps"].long()
        input_noise = perturbed_noise(noise, batch.get("perturbation_noise"), options.input_perturbation)
        noisy_latents = scheduler.add_noise(latents, input_noise, timesteps)
        prompt_embeds = batch["prompt_embeds"].to(weight_dtype)
        added = {"text_embeds": batch["pooled_prompt_embeds"].to(weight_dtype),
                 "time_ids": batch["time_ids"].to(weight_dtype)}
        residuals = {}
        if controlnet is not None:  # None: the UNet alone (text-to-image training of the UNet itself)
            down_samples, mid_sample = controlnet(
                noisy_latents, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added,
                controlnet_cond=batch["conditioning_pixel_values"].to(weight_dtype), return_dict=False,
            )
            residuals = {"down_block_additional_residuals": [s.to(weight_dtype) for s in down_samples],
                         "mid_block_additional_residual": mid_sample.to(weight_dtype)}
        model_pred = (denoiser or self.denoiser)(
            noisy_latents, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added, **residuals,
        ).sample
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise SkingenError(f"noise scheduler prediction_type {prediction_type!r} is not supported "
                               "(epsilon, v_prediction)")
        weighting = None
        if options.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            weights = min_snr_weights(compute_snr(scheduler, timesteps), options.snr_gamma, prediction_type)
            weighting = weights.view(-1, *([1] * (model_pred.dim() - 1)))
        return ddpm_output(model_pred=model_pred, noisy_latents=noisy_latents, latents=latents, timesteps=timesteps,
                           noise=noise, noise_scheduler=scheduler, target=target, weighting=weighting)

    # -- the ControlNet -------------------------------------------------------------------------------------

    def new_controlnet(self):
        from diffusers import ControlNetModel

        return ControlNetModel.from_unet(self.denoiser)

    @classmethod
    def controlnet_mismatches(cls, controlnet_config: dict, denoiser_config) -> list[str]:
        return config_mismatches(controlnet_config, denoiser_config, [
            ("cross_attention_dim", "cross_attention_dim"), ("in_channels", "in_channels"),
            ("addition_embed_type", "addition_embed_type"), ("block_out_channels", "block_out_channels"),
            ("projection_class_embeddings_input_dim", "projection_class_embeddings_input_dim"),
        ])

    # -- generating -----------------------------------------------------------------------------------------

    def save_denoiser_lora(self, output_dir) -> Path:
        """The UNet's LoRA (``--unet_lora_rank``) as ``OUTPUT_DIR/pytorch_lora_weights.safetensors`` in diffusers'
        format, which ``StableDiffusionXLControlNetPipeline.load_lora_weights`` reads."""
        from diffusers import StableDiffusionXLPipeline

        return save_lora(lambda folder: StableDiffusionXLPipeline.save_lora_weights(
            folder, unet_lora_layers=diffusers_lora_state(self.denoiser), safe_serialization=True), output_dir)

    def validation_pipeline(self, controlnet, scheduler=None):
        from diffusers import StableDiffusionXLControlNetPipeline, UniPCMultistepScheduler

        return StableDiffusionXLControlNetPipeline(
            vae=self.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=self.denoiser,
            controlnet=controlnet, add_watermarker=False,
            scheduler=scheduler or UniPCMultistepScheduler.from_config(self.noise_scheduler.config),
        )


def ddpm_output(*, model_pred: torch.Tensor, noisy_latents: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor,
                noise: torch.Tensor, noise_scheduler, target: torch.Tensor | None = None,
                weighting: torch.Tensor | None = None) -> DenoiserOutput:
    """The output of a DDPM (epsilon or v) step: x0 estimate and alpha_bar from the scheduler; the target is the
    noise (epsilon) or the velocity unless given."""
    prediction_type = noise_scheduler.config.prediction_type
    if target is None:
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha_bar = alphas_cumprod[timesteps.long()]

    def estimate_x0(rows):
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        return ddpm_x0(pick(noisy_latents), pick(model_pred), pick(alpha_bar), prediction_type)

    return DenoiserOutput(model_pred=model_pred, target=target, latents=latents, noisy_latents=noisy_latents,
                          noise=noise, timesteps=timesteps, estimate_x0=estimate_x0, signal=alpha_bar, weighting=weighting)


def ddpm_x0(noisy_latents: torch.Tensor, model_pred: torch.Tensor, alpha_bar: torch.Tensor,
            prediction_type: str) -> torch.Tensor:
    """One-step estimate of the clean latents from an epsilon or v prediction (fp32)."""
    shape = (-1, *([1] * (noisy_latents.dim() - 1)))
    alpha_bar = alpha_bar.float().view(shape)
    noisy, pred = noisy_latents.float(), model_pred.float()
    if prediction_type == "epsilon":
        return (noisy - (1 - alpha_bar).sqrt() * pred) / alpha_bar.sqrt()
    return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * pred  # v_prediction


# ---------------------------------------------------------------------------------------------------------------
# Functions other modules use directly (generation, tests)


def load_sdxl_components(pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None,
                         variant: str | None = None, vae_model_name_or_path: str | os.PathLike | None = None,
                         cache_dir: str | os.PathLike | None = None) -> SDXLComponents:
    """Load what SDXL ControlNet training needs, as diffusers' ``train_controlnet_sdxl.py`` does (the noise
    scheduler is a ``DDPMScheduler`` configured from the pipeline's ``scheduler/``)."""
    import argparse

    args = argparse.Namespace(pretrained_model_name_or_path=pretrained_model_name_or_path, revision=revision,
                              variant=variant, pretrained_vae_model_name_or_path=vae_model_name_or_path,
                              cache_dir=cache_dir, crops_coords_top_left_h=None, crops_coords_top_left_w=None)
    backbone = SDXLBackbone(args)
    return SDXLComponents(*backbone.tokenizers, *backbone.text_encoders, vae=backbone.vae, unet=backbone.denoiser,
                          noise_scheduler=backbone.noise_scheduler)


def load_or_init_controlnet(unet, controlnet_model_name_or_path: str | os.PathLike | None = None, *,
                            conditioning_embedding_out_channels: Sequence[int] | None = None):
    """Load a ControlNet (after the architecture check against ``unet``) or initialise one from the UNet's weights.

    ``conditioning_embedding_out_channels`` only applies to a new ControlNet (default: diffusers' ``from_unet`` one).
    """
    from diffusers import ControlNetModel

    if controlnet_model_name_or_path is None:
        kwargs = {}
        if conditioning_embedding_out_channels is not None:
            kwargs["conditioning_embedding_out_channels"] = tuple(conditioning_embedding_out_channels)
        return ControlNetModel.from_unet(unet, **kwargs)
    source = check_controlnet_source(SDXLBackbone, controlnet_model_name_or_path, unet.config,
                                     source_of_base="the SDXL base model")
    return load_part("ControlNet", source, ControlNetModel.from_pretrained, layout_help=SDXLBackbone.controlnet_help())


@torch.no_grad()
def encode_prompt(prompts: Sequence[str], tokenizers: Sequence, text_encoders: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt embeddings as diffusers' trainer computes them (text encoders frozen, so no gradients).

    Returns ``prompt_embeds`` (B, 77, hidden_1 + hidden_2): the penultimate hidden states of both encoders,
    concatenated; and ``pooled_prompt_embeds`` (B, projection_dim): the projected pooled output of the last encoder.
    """
    prompts = list(prompts)
    embeds = []
    pooled = None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        input_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids
        output = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True, return_dict=True)
        pooled = output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output
        hidden = output.hidden_states[-2]
        embeds.append(hidden.view(hidden.shape[0], hidden.shape[1], -1))
    return torch.cat(embeds, dim=-1), pooled.view(len(prompts), -1)


def compute_time_ids(original_size: Sequence[int], crops_coords_top_left: Sequence[int], target_size: Sequence[int],
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """SDXL's 6 micro-conditioning ids: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    values = list(original_size) + list(crops_coords_top_left) + list(target_size)
    if len(values) != 6:
        raise ValueError(f"time ids need 2 + 2 + 2 values (height, width pairs), got {values}")
    return torch.tensor(values, dtype=dtype if dtype is not None else torch.float32)


__all__ = ["SDXLBackbone", "SDXLComponents", "compute_time_ids", "ddpm_output", "encode_prompt", "load_or_init_controlnet",
           "load_sdxl_components", "resolve_model_source"]
