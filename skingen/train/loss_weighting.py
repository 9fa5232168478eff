"""Loss options of diffusers' text-to-image trainers: min-SNR weighting, offset noise, input perturbation.

Each follows ``examples/text_to_image/train_text_to_image.py``; the random draws they need come with each
sample (``skingen.train.batches``), so resumed and multi-process runs stay exact.

- ``--noise_offset s``: the noise becomes ``noise + s * n`` with ``n`` one normal draw per sample and channel
  (broadcast over height and width); it is both the noise added and the target.
- ``--input_perturbation p``: the latents are noised with ``noise + p * m`` (``m`` fresh normal noise) while the
  target stays ``noise``.
- ``--timestep_bias_strategy`` (SDXL): the training timestep is drawn from weights that are ``--timestep_bias_multiplier``
  times larger on the ``later`` (noisier) or ``earlier`` ``--timestep_bias_portion`` of the schedule, or on
  ``range`` ``[--timestep_bias_begin, --timestep_bias_end)``, as ``train_text_to_image_sdxl.py``'s
  ``generate_timestep_weights``. ``later`` puts more steps where the layout of an image is decided, which is what a
  ControlNet must learn to steer (T2I-Adapter's cubic sampling has the same aim).
- ``--snr_gamma g``: per-sample weights ``min(SNR(t), g) / SNR(t)`` for epsilon prediction and
  ``min(SNR(t), g) / (SNR(t) + 1)`` for v-prediction, on the per-sample mean squared error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import SkingenError


@dataclass(frozen=True)
class LossOptions:
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0

    @classmethod
    def from_args(cls, args) -> LossOptions:
        return cls(snr_gamma=getattr(args, "snr_gamma", None), noise_offset=getattr(args, "noise_offset", 0.0),
                   input_perturbation=getattr(args, "input_perturbation", 0.0))


TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")


@dataclass(frozen=True)
class TimestepBias:
    strategy: str = "none"
    multiplier: float = 1.0
    portion: float = 0.25
    begin: int = 0
    end: int = 1000

    @classmethod
    def from_args(cls, args) -> TimestepBias:
        return cls(strategy=getattr(args, "timestep_bias_strategy", "none"),
                   multiplier=getattr(args, "timestep_bias_multiplier", 1.0),
                   portion=getattr(args, "timestep_bias_portion", 0.25),
                   begin=getattr(args, "timestep_bias_begin", 0), end=getattr(args, "timestep_bias_end", 1000))

    def check(self) -> None:
        if self.strategy not in TIMESTEP_BIAS_STRATEGIES:
            raise SkingenError(f"--timestep_bias_strategy must be one of {', '.join(TIMESTEP_BIAS_STRATEGIES)}, "
                               f"got {self.strategy!r}")
        if self.multiplier <= 0:
            raise SkingenError(f"--timestep_bias_multiplier must be > 0 (1: no bias), got {self.multiplier}")
        if self.strategy in ("earlier", "later") and not 0 < self.portion <= 1:
            raise SkingenError(f"--timestep_bias_portion must be in (0, 1], got {self.portion}")
        if self.strategy == "range" and not 0 <= self.begin < self.end:
            raise SkingenError(f"--timestep_bias_begin/--timestep_bias_end must satisfy 0 <= begin < end, got "
                               f"{self.begin} and {self.end}")

    def weights(self, num_timesteps: int) -> torch.Tensor | None:
        """Sampling weights over ``range(num_timesteps)`` (summing to 1), or None for uniform sampling."""
        if self.strategy == "none" or self.multiplier == 1.0:
            return None
        weights = torch.ones(num_timesteps, dtype=torch.float64)
        count = max(1, int(self.portion * num_timesteps))
        if self.strategy == "later":
            weights[-count:] *= self.multiplier
        elif self.strategy == "earlier":
            weights[:count] *= self.multiplier
        else:
            if self.begin >= num_timesteps:
                raise SkingenError(f"--timestep_bias_begin {self.begin} is past the schedule's {num_timesteps} timesteps")
            weights[self.begin:min(self.end, num_timesteps)] *= self.multiplier
        return weights / weights.sum()


def offset_noise(noise: torch.Tensor, offset_draw: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``noise + scale * offset_draw`` (``offset_draw``: (B, C, 1, 1)); ``noise`` itself when off."""
    if not scale or offset_draw is None:
        return noise
    return noise + scale * offset_draw.to(noise.dtype)


def perturbed_noise(noise: torch.Tensor, perturbation_draw: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The noise the latents are noised with under input perturbation; ``noise`` itself when off."""
    if not scale or perturbation_draw is None:
        return noise
    return noise + scale * perturbation_draw.to(noise.dtype)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample for a noise (epsilon) or velocity prediction."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise SkingenError(f"--snr_gamma: prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean squared error, each sample's mean scaled by its weight when ``weights`` is given (in fp32)."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=list(range(1, prediction.ndim)))
    return (per_sample * weights.float()).mean()
