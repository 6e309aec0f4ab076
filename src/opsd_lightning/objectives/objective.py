"""The distillation objective: a divergence, per-token weights and diagnostics, on full-vocabulary logits.

`objective_sum` is the full-logits form; `chunked_objective_sum` (objectives/chunked.py) gives the same
numbers from hidden states a chunk at a time, through the same `token_terms` and `weighted_sum`.
Per token, `l_i = w_i · D_i + g_i · KL(T‖S)_i` (see `objectives/weighting.py`); the result is `Σ l_i`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opsd_lightning.objectives.diagnostics import (
    DistributionStats,
    TokenDiagnostics,
    distribution_stats,
    entropy,
    token_diagnostics,
)
from opsd_lightning.objectives.divergences import Divergence, ForwardKL
from opsd_lightning.objectives.weighting import NoWeighting, TokenFeatures, TokenWeighting

__all__ = ["ObjectiveSum", "TokenTerms", "objective_sum", "token_terms", "weighted_sum"]


@dataclass(frozen=True)
class ObjectiveSum:
    """The summed per-token objective (student grad only) and, when asked for, the diagnostic sums."""

    loss_sum: Tensor
    diagnostics: TokenDiagnostics | None = None


@dataclass(frozen=True)
class TokenTerms:
    """What an objective reads from a slice's full-vocabulary logits besides the divergence (no grad)."""

    divergence_weights: Tensor | None  # w_i; None: all 1
    forward_kl_weights: Tensor | None  # g_i; None: no added term
    features: TokenFeatures | None
    stats: DistributionStats | None  # for the diagnostics


def token_terms(
    student_logits: Tensor | None,
    teacher_logits: Tensor,
    divergence: Divergence,
    weighting: TokenWeighting | None,
    features: TokenFeatures | None,
    diagnostics: bool,
) -> TokenTerms:
    """Weights (teacher entropy first, where the weighting reads it) and diagnostic statistics of a slice.
    `student_logits` (full width) are read only for the diagnostics."""
    stats = None
    if diagnostics:
        if student_logits is None:
            raise ValueError("diagnostics need the student's full-vocabulary logits")
        stats = distribution_stats(student_logits, teacher_logits, divergence.temperature)
    if weighting is None or isinstance(weighting, NoWeighting):
        return TokenTerms(None, None, features, stats)  # weights of 1: skip the products altogether
    if features is None:
        raise ValueError(f"{type(weighting).__name__} needs TokenFeatures (position, length) of the tokens")
    if weighting.needs_teacher_entropy:
        teacher_entropy = stats.teacher_entropy if stats is not None else None
        if teacher_entropy is None:
            teacher_entropy = entropy(teacher_logits, divergence.temperature)
        features = features.with_teacher_entropy(teacher_entropy)
    return TokenTerms(
        weighting.divergence_weights(features), weighting.forward_kl_weights(features), features, stats
    )


def weighted_sum(values: Tensor, terms: TokenTerms, forward_kl_values: Tensor | None) -> Tensor:
    """Σ_i w_i · D_i + g_i · KL(T‖S)_i, in `values`' dtype."""
    weighted = values if terms.divergence_weights is None else values * terms.divergence_weights
    if terms.forward_kl_weights is not None and forward_kl_values is not None:
        weighted = weighted + terms.forward_kl_weights * forward_kl_values
    return weighted.sum()


def objective_sum(
    student_logits: Tensor,
    teacher_logits: Tensor,
    token_ids: Tensor,
    divergence: Divergence,
    weighting: TokenWeighting | None = None,
    features: TokenFeatures | None = None,
    diagnostics: bool = False,
) -> ObjectiveSum:
    """Σ over the N tokens of the weighted objective on full logits [N, V] (gradient through autograd,
    into the student's logits only), and the tokens' `TokenDiagnostics` when `diagnostics`."""
    terms = token_terms(student_logits, teacher_logits, divergence, weighting, features, diagnostics)
    values = divergence.per_token(student_logits, teacher_logits, token_ids)
    forward_kl = None
    if terms.forward_kl_weights is not None:
        forward_kl = ForwardKL(divergence.temperature).per_token(student_logits, teacher_logits, token_ids)
    loss_sum = weighted_sum(values, terms, forward_kl)
    if not diagnostics:
        return ObjectiveSum(loss_sum)
    assert terms.stats is not None
    clipped = divergence.clipped(student_logits, teacher_logits, token_ids)
    with torch.no_grad():
        summary = token_diagnostics(terms.stats, values.detach(), clipped, terms.features)
    return ObjectiveSum(loss_sum, summary)
