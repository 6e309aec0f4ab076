"""Policy-gradient pieces for the GRPO baseline: group-normalised advantages and the clipped objective."""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """(r - mean of its group) / (std of its group + eps), groups being consecutive runs of `group_size`.

    A group whose rewards are all equal has zero advantage: it carries no signal.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    return (centred / (std + eps)).view(-1)


def clipped_policy_loss(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """Per-token PPO/GRPO surrogate: -min(ρ·A, clip(ρ, 1-ε, 1+ε)·A) with ρ = exp(logp_new - logp_old)."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    return -torch.minimum(unclipped, clipped)


def k3_kl(logp: Tensor, logp_reference: Tensor) -> Tensor:
    """Per-token KL(π‖π_ref) estimator exp(ref - logp) - (ref - logp) - 1 (non-negative, unbiased)."""
    log_ratio = logp_reference - logp
    return torch.exp(log_ratio) - log_ratio - 1.0
