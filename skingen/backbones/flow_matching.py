"""Rectified-flow training shared by SD3 and FLUX (diffusers' ``train_controlnet_sd3.py``/``_flux.py`` math).

The noise level is a sigma in [0, 1]: ``u`` is drawn from ``--weighting_scheme``'s density
(``diffusers.training_utils.compute_density_for_timestep_sampling``, here with each sample's own generator),
picks the scheduler's training timestep ``timesteps[int(u * N)]`` and ``sigma = timestep / N``. The input is
``x_t = (1 - sigma) * x0 + sigma * noise``, the target the velocity ``noise - x0`` (or ``x0`` itself with
SD3's ``--precondition_outputs``), the loss weighted by ``compute_loss_weighting_for_sd3``, and the one-step
clean estimate ``x0 = x_t - sigma * v``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

from ..errors import SkingenError
from ..train.loss_weighting import offset_noise, perturbed_noise
from .base import Backbone, DenoiserOutput

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
# Samplers of the flow-matching families (their pipelines pass flow sigmas and FLUX's resolution shift ``mu``).
FLOW_SCHEDULERS = {"flow_euler": "FlowMatchEulerDiscreteScheduler"}


class FlowMatchingBackbone(Backbone):
    default_weighting_scheme = "logit_normal"
    encodes_conditioning = True
    schedulers = FLOW_SCHEDULERS
    default_scheduler = "flow_euler"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(f"{cls.title} flow matching")
        group.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default=cls.default_weighting_scheme,
                           help="Density of the training noise level (logit_normal, mode) or loss weighting over a "
                                "uniform one (sigma_sqrt, cosmap); none: uniform and unweighted.")
        group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal scheme.")
        group.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal scheme.")
        group.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme.")
        group.add_argument("--max_sequence_length", type=int, default=cls.default_max_sequence_length,
                           help="T5 tokens per caption (longer captions are cut and counted in a warning).")

    @classmethod
    def validate_arguments(cls, args: argparse.Namespace) -> None:
        if args.logit_std <= 0:
            raise SkingenError(f"--logit_std must be positive, got {args.logit_std}")
        if args.max_sequence_length < 1:
            raise SkingenError(f"--max_sequence_length must be at least 1, got {args.max_sequence_length}")
        # Options of the SDXL trainer that have no meaning (or no implementation) for a flow-matching transformer.
        if getattr(args, "snr_gamma", None) is not None:
            raise SkingenError(f"--snr_gamma is min-SNR weighting of DDPM timesteps; {cls.title} trains with flow "
                               "matching: use --weighting_scheme instead")
        if getattr(args, "unet_lora_rank", None):
            raise SkingenError(f"--unet_lora_rank adds LoRA to an SDXL UNet; {cls.title} has a transformer (not supported)")
        columns = getattr(args, "conditioning_image_column", None)
        if isinstance(columns, list) and len(columns) > 1:
            raise SkingenError(f"several --conditioning_image_column: {cls.title}'s ControlNet reads one conditioning "
                               "image through the VAE; give one column")

    def load_scheduler(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.noise_scheduler = self.part("noise scheduler", FlowMatchEulerDiscreteScheduler.from_pretrained, "scheduler")
        # The training schedule is the one the scheduler is built with (a sampler's set_timesteps changes it).
        self.training_timesteps = copy.deepcopy(self.noise_scheduler).timesteps.float().clone()

    def draw_timestep(self, generator: torch.Generator) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        args = self.args
        u = compute_density_for_timestep_sampling(args.weighting_scheme, 1, logit_mean=args.logit_mean,
                                                  logit_std=args.logit_std, mode_scale=args.mode_scale,
                                                  generator=generator)
        index = (u * self.num_train_timesteps).long().clamp(0, len(self.training_timesteps) - 1)
        return self.training_timesteps[index][0]

    def fixed_timestep(self, timestep: int) -> torch.Tensor:
        return torch.tensor(float(timestep))  # sigma = timestep / N, as for the sampled ones

    def sigmas(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        sigma = timesteps.float() / self.num_train_timesteps
        return sigma.view(-1, *([1] * (ndim - 1)))

    def loss_weighting(self, sigmas: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.args.weighting_scheme, sigmas)

    @torch.no_grad()
    def control_latents(self, batch: dict, weight_dtype: torch.dtype) -> torch.Tensor:
        """The conditioning image through the VAE, normalised like the latents (the distribution's mean, so the
        ControlNet input does not depend on a random draw)."""
        pixels = batch["conditioning_pixel_values"] * 2.0 - 1.0
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        return self.normalize_latents(latents.float()).to(weight_dtype)

    def forward(self, batch: dict, controlnet, weight_dtype: torch.dtype, denoiser=None) -> DenoiserOutput:
        """One training step's prediction: the velocity at the batch's noisy latents; target noise - x0, and
        x0 = x_t - sigma * v (SD3 overrides it for diffusers' --precondition_outputs)."""
        latents, noise, sigmas, noisy = self.flow_step(batch, weight_dtype)
        timesteps = batch["timesteps"].float()
        velocity = self.velocity(noisy, timesteps, batch, self.step_control(batch, controlnet, weight_dtype), controlnet,
                                 weight_dtype, denoiser)

        def estimate_x0(rows):
            pick = (lambda t: t) if rows is None else (lambda t: t[rows])
            return pick(noisy).float() - pick(sigmas) * pick(velocity).float()

        return DenoiserOutput(model_pred=velocity, target=noise - latents, latents=latents, noisy_latents=noisy,
                              noise=noise, timesteps=timesteps, estimate_x0=estimate_x0,
                              signal=(1 - sigmas.flatten()) ** 2, weighting=self.loss_weighting(sigmas))

    def step_control(self, batch: dict, controlnet, weight_dtype: torch.dtype) -> torch.Tensor | None:
        """The control latents of a training step; None without a ControlNet (nothing reads them)."""
        return None if controlnet is None else self.control_latents(batch, weight_dtype)

    def velocity(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: dict, control: torch.Tensor | None,
                 controlnet, weight_dtype: torch.dtype, denoiser=None) -> torch.Tensor:
        """The velocity ``noise - x0`` that ControlNet + denoiser predict at ``noisy`` ``(B, C, h, w)`` and
        ``timesteps`` (sigma x num_train_timesteps), for cached prompt entries ``prompts`` and control latents
        ``control`` (:meth:`control_latents`); with ``controlnet=None`` the denoiser's own (``control`` unread).
        ``denoiser``: the module to call instead of ``self.denoiser`` (accelerate's wrapper when it trains). The
        training step (:meth:`forward`) and samplers call it."""
        raise NotImplementedError(f"{self.title}: no velocity call")

    def save_denoiser_lora(self, output_dir) -> Path:
        """The transformer's LoRA (GRPO's ``--denoiser_lora_rank``) as ``OUTPUT_DIR/pytorch_lora_weights.safetensors``
        in diffusers' format, which the family's pipelines read with ``load_lora_weights``."""
        import diffusers

        from ..train.lora import diffusers_lora_state, save_lora

        pipeline_class = getattr(diffusers, self.base_pipeline_classes[0])
        return save_lora(lambda folder: pipeline_class.save_lora_weights(
            folder, transformer_lora_layers=diffusers_lora_state(self.denoiser), safe_serialization=True), output_dir)

    # -- sampling -------------------------------------------------------------------------------------------

    def pipeline_sigmas(self, num_steps: int) -> np.ndarray | None:
        """The sigmas the family's ControlNet pipeline passes to its scheduler (None: the scheduler's own)."""
        return None

    def pipeline_shift(self, latent_height: int, latent_width: int) -> float | None:
        """The resolution-dependent shift ``mu`` the pipeline passes when the scheduler shifts dynamically
        (diffusers' ``calculate_shift`` over the packed token count); None otherwise."""
        config = self.noise_scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        tokens = (latent_height // 2) * (latent_width // 2)
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (max_shift - base_shift) / (max_len - base_len)
        return tokens * slope + base_shift - slope * base_len

    def sampling_sigmas(self, num_steps: int, latent_height: int, latent_width: int) -> torch.Tensor:
        """``num_steps + 1`` sigmas (1 -> 0) of the family pipeline's Euler sampler at this latent size: the
        scheduler's ``set_timesteps`` on a copy, as the pipeline calls it."""
        scheduler = copy.deepcopy(self.noise_scheduler)
        kwargs = {}
        mu = self.pipeline_shift(latent_height, latent_width)
        if mu is not None:
            kwargs["mu"] = mu
        sigmas = self.pipeline_sigmas(num_steps)
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas, **kwargs)
        else:
            scheduler.set_timesteps(num_steps, **kwargs)
        return scheduler.sigmas.float().cpu()

    def flow_step(self, batch: dict, weight_dtype: torch.dtype):
        """``(latents, noise, sigmas, noisy latents)`` of a batch."""
        options = self.loss_options
        latents = self.clean_latents(batch, weight_dtype)
        noise = offset_noise(batch["noise"].to(weight_dtype), batch.get("offset_noise"), options.noise_offset)
        input_noise = perturbed_noise(noise, batch.get("perturbation_noise"), options.input_perturbation)
        sigmas = self.sigmas(batch["timesteps"], latents.ndim).to(latents.device)
        noisy = ((1.0 - sigmas) * latents.float() + sigmas * input_noise.float()).to(weight_dtype)
        return latents, noise, sigmas, noisy
