"""Flow-GRPO's stochastic sampler for rectified-flow models: the Euler ODE step turned into an SDE step with the
same marginals, whose transition is a Gaussian with known mean and standard deviation, so the log-probability of
each step of a sampled trajectory is known (and differentiable in the model's velocity).

With ``sigma`` the current and ``sigma_next`` the next noise level (``dt = sigma_next - sigma < 0``), velocity
``v`` and ``s = noise_level * sqrt(sigma / (1 - sigma))`` (``sigma = 1`` replaced by the schedule's second sigma):

    mean = x * (1 + s^2 / (2 sigma) * dt) + v * (1 + s^2 (1 - sigma) / (2 sigma)) * dt
    x_next = mean + s * sqrt(-dt) * eps

``noise_level = 0`` is the pipeline's Euler step ``x + v * dt``. The log-probability is averaged over the latent's
elements, as Flow-GRPO does (ratios stay near 1, hence its small clip range).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, timesteps (B,)) -> velocity


@dataclass
class SDEStep:
    sample: torch.Tensor  # x_next
    log_prob: torch.Tensor  # (B,), mean over elements
    mean: torch.Tensor  # the Gaussian's mean
    std: torch.Tensor  # its standard deviation (a scalar tensor)


def step_std(sigma: float, sigma_next: float, noise_level: float, sigma_cap: float) -> float:
    """The standard deviation ``s * sqrt(-dt)`` of one step's Gaussian."""
    ratio_sigma = sigma_cap if sigma >= 1.0 else sigma
    return noise_level * math.sqrt(sigma / (1.0 - ratio_sigma)) * math.sqrt(sigma - sigma_next)


def sde_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: float, sigma_next: float, *, noise_level: float,
             sigma_cap: float, prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> SDEStep:
    """One step from ``sample`` at ``sigma`` to ``sigma_next``: draws ``x_next = mean + std * noise`` unless
    ``prev_sample`` (a step already taken) is given; returns its log-probability under the step's Gaussian."""
    velocity, sample = velocity.float(), sample.float()
    dt = sigma_next - sigma
    ratio_sigma = sigma_cap if sigma >= 1.0 else sigma
    s2 = noise_level ** 2 * sigma / (1.0 - ratio_sigma)
    mean = sample * (1 + s2 / (2 * sigma) * dt) + velocity * (1 + s2 * (1 - sigma) / (2 * sigma)) * dt
    std = torch.tensor(step_std(sigma, sigma_next, noise_level, sigma_cap), device=sample.device)
    if prev_sample is None:
        prev_sample = mean if noise is None or std == 0 else mean + std * noise.float()
    prev_sample = prev_sample.float()
    if std > 0:
        log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std)
                    - 0.5 * math.log(2 * math.pi))
        log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    else:  # the ODE step: a point mass
        log_prob = torch.zeros(sample.shape[0], device=sample.device)
    return SDEStep(prev_sample, log_prob, mean, std)


@dataclass
class Trajectories:
    """Sampled trajectories: ``latents[:, j]`` is the state before step ``j`` (``latents[:, -1]`` the clean
    latents), ``log_probs[:, j]`` the log-probability of step ``j``, ``sigmas`` the ``T + 1`` noise levels."""

    latents: torch.Tensor  # (B, T + 1, C, h, w), fp32
    log_probs: torch.Tensor  # (B, T)
    sigmas: torch.Tensor  # (T + 1,)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


def trajectory_noise(seeds: Sequence[int], num_steps: int, shape: Sequence[int]) -> torch.Tensor:
    """``(B, T + 1, *shape)`` standard normal draws, trajectory ``b`` from its own seed: the initial latents, then
    one draw per step (so a trajectory does not depend on the batch it is sampled in)."""
    return torch.stack([torch.randn((num_steps + 1, *shape), generator=torch.Generator().manual_seed(int(seed)))
                        for seed in seeds])


@torch.no_grad()
def sample_trajectories(velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor, *, noise_level: float,
                        num_train_timesteps: int) -> Trajectories:
    """Run the sampler from ``noise[:, 0]`` through ``sigmas`` (1 -> 0), drawing step ``j``'s noise from
    ``noise[:, j + 1]``; ``noise_level = 0`` is the pipeline's Euler ODE sampler."""
    sigma_list = sigmas.tolist()
    sigma_cap = sigma_list[1]
    x = noise[:, 0].float()
    states, log_probs = [x], []
    for j in range(len(sigma_list) - 1):
        timesteps = torch.full((x.shape[0],), sigma_list[j] * num_train_timesteps, device=x.device)
        step = sde_step(velocity(x, timesteps), x, sigma_list[j], sigma_list[j + 1], noise_level=noise_level,
                        sigma_cap=sigma_cap, noise=noise[:, j + 1])
        x = step.sample
        states.append(x)
        log_probs.append(step.log_prob)
    return Trajectories(torch.stack(states, dim=1), torch.stack(log_probs, dim=1), sigmas)
