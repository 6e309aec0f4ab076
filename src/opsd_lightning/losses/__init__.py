"""Distillation losses: per-token divergences between teacher and student distributions."""

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
    "ForwardKL",
    "GeneralizedJSD",
    "ReverseKL",
    "SampledToken",
    "TopK",
    "masked_token_sum",
]
