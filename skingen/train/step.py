"""One training step's losses: the backbone's ControlNet + frozen denoiser (or the trained denoiser alone), its
diffusion loss and the extra losses; and the same at fixed timesteps and noise for the validation losses (``--validation_loss_timesteps``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..backbones.base import Backbone
from .batches import TrainingSamples, batch_to_device, collate_samples, sample_seed
from .extra_losses import ExtraLoss


@dataclass
class StepLosses:
    loss: torch.Tensor
    loss_diffusion: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # loss_<name> of each extra loss, weighted
    extra_logs: dict[str, float] = field(default_factory=dict)


def fixed_timestep_losses(samples: TrainingSamples, *, rows: Sequence[int], timesteps: Sequence[int], seed: int,
                          batch_size: int, device, controlnet, backbone: Backbone, weight_dtype: torch.dtype,
                          extra_losses: Sequence[ExtraLoss], step: int, denoiser=None) -> dict[str, float]:
    """The losses of ``rows`` at each of ``timesteps``, with each row's noise fixed by ``seed`` (the same at every
    call), no caption dropout and no gradients: ``val_loss_diffusion``, ``val_loss_<extra>`` and ``val_<log>`` for
    the extra loss's logs, each a mean over the (row, timestep) pairs that produced it."""
    pairs = [(row, timestep) for row in rows for timestep in timesteps]
    # A batch holds one training size (rows of different aspect-ratio buckets do not stack).
    pairs.sort(key=lambda pair: samples.target_size(pair[0]))
    chunks = [group[start:start + batch_size]
              for _, grouped in itertools.groupby(pairs, key=lambda pair: samples.target_size(pair[0]))
              for group in [list(grouped)] for start in range(0, len(group), batch_size)]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for chunk in chunks:
            batch = collate_samples([samples.sample(row, sample_seed(seed, -2, row), fixed_timestep=timestep)
                                     for row, timestep in chunk])
            losses = compute_losses(batch_to_device(batch, device), controlnet=controlnet, backbone=backbone,
                                    weight_dtype=weight_dtype, extra_losses=extra_losses, step=step, denoiser=denoiser)
            values = {"loss_diffusion": losses.loss_diffusion.item(), **losses.extra_logs,
                      **{name: value.item() for name, value in losses.extras.items()}}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(chunk)
                counts[key] = counts.get(key, 0) + len(chunk)
    return {f"val_{key}": sums[key] / counts[key] for key in sums}


def compute_losses(batch: dict, *, controlnet, backbone: Backbone, weight_dtype: torch.dtype,
                   extra_losses: Sequence[ExtraLoss], step: int, denoiser=None) -> StepLosses:
    """One forward pass: the backbone's ControlNet + frozen denoiser and its diffusion loss, plus the extra losses.
    ``controlnet=None``: the denoiser alone, called through ``denoiser`` when given (the trained, wrapped one)."""
    output = backbone.forward(batch, controlnet, weight_dtype, denoiser=denoiser)
    loss_diffusion = output.diffusion_loss()
    extras, extra_logs = {}, {}
    for extra_loss in extra_losses:
        extras[f"loss_{extra_loss.name}"], logs = extra_loss(batch=batch, output=output, backbone=backbone,
                                                            weight_dtype=weight_dtype, step=step)
        extra_logs.update(logs)
    return StepLosses(loss_diffusion + sum(extras.values()), loss_diffusion, extras, extra_logs)
