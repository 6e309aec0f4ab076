"""Distillation losses: per-token divergences between teacher and student distributions."""

from opsd_lightning.losses.chunked import LossSettings, chunked_divergence_sum, naive_divergence_sum
from opsd_lightning.losses.divergences import (
    Divergence,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SampledToken,
    TopK,
    masked_token_sum,
)

__all__ = [
    "Divergence",
    "LossSettings",
    "chunked_divergence_sum",
    "naive_divergence_sum",
    "ForwardKL",
    "GeneralizedJSD",
    "ReverseKL",
    "SampledToken",
    "TopK",
    "masked_token_sum",
]
