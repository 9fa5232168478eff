"""GRPO's objective (Flow-GRPO): advantages normalised within each group of images of one control, and per
denoising step the clipped policy ratio (PPO) plus a KL penalty to the starting model.

For step ``j`` of a trajectory with advantage ``A`` (clipped to ``[-adv_clip_max, adv_clip_max]``) and
``r = exp(log p_theta(x_{j+1} | x_j) - log p_old(x_{j+1} | x_j))``:

    policy loss = mean(max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range)))
    KL          = mean over images of |mean_theta - mean_ref|^2 / (2 std^2)   (per latent element)

``loss = policy loss + beta * KL``. Both steps' Gaussians share their standard deviation, so the KL between them
is that squared distance of the means; Flow-GRPO's code divides by ``s^2`` without the step size ``-dt``
(a per-step rescaling of ``beta``); here it is the Gaussians' own KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, *, global_std: bool = False,
                     eps: float = 1e-4) -> torch.Tensor:
    """``(r - group mean) / (group std + eps)`` for consecutive groups of ``group_size`` rewards (population std,
    as Flow-GRPO's per-prompt tracker); ``global_std`` divides by the std of all rewards instead."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.double().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = rewards.double().std(unbiased=False) if global_std else groups.std(dim=1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1).to(rewards.dtype)


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *, clip_range: float,
              adv_clip_max: float, beta: float = 0.0, mean: torch.Tensor | None = None,
              ref_mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> PolicyLoss:
    """The loss of one denoising step over a batch of trajectories (``log_prob`` etc. of shape ``(B,)``)."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy = torch.maximum(unclipped, clipped).mean()
    kl = torch.zeros((), device=log_prob.device)
    if beta > 0:
        distance = (mean - ref_mean) ** 2
        kl = (distance.mean(dim=tuple(range(1, distance.ndim))) / (2 * std ** 2)).mean()
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
        approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
    return PolicyLoss(policy + beta * kl, policy.detach(), kl.detach(), clip_fraction, approx_kl)
