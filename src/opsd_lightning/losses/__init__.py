"""Distillation losses: per-token divergences, token weights and diagnostics, full-logits and chunked."""

from opsd_lightning.losses.chunked import (
    chunked_divergence_sum,
    chunked_objective_sum,
    naive_divergence_sum,
)
from opsd_lightning.losses.diagnostics import DIAGNOSTIC_KEYS, TokenDiagnostics
from opsd_lightning.losses.divergences import (
    Divergence,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SampledToken,
    TopK,
    masked_token_sum,
)
from opsd_lightning.losses.objective import ObjectiveSum, objective_sum
from opsd_lightning.losses.settings import LossSettings
from opsd_lightning.losses.terms import (
    NLL,
    ClippedPolicy,
    Distill,
    KLToReference,
    ObjectiveTerm,
    TermInputs,
    TermSum,
)
from opsd_lightning.losses.weighting import (
    EntropyGate,
    NoWeighting,
    PositionWeighting,
    TokenFeatures,
    TokenWeighting,
)

__all__ = [
    "NLL",
    "ClippedPolicy",
    "Distill",
    "KLToReference",
    "ObjectiveTerm",
    "TermInputs",
    "TermSum",
    "DIAGNOSTIC_KEYS",
    "Divergence",
    "EntropyGate",
    "ForwardKL",
    "GeneralizedJSD",
    "LossSettings",
    "NoWeighting",
    "ObjectiveSum",
    "PositionWeighting",
    "ReverseKL",
    "SampledToken",
    "TokenDiagnostics",
    "TokenFeatures",
    "TokenWeighting",
    "TopK",
    "chunked_divergence_sum",
    "chunked_objective_sum",
    "masked_token_sum",
    "naive_divergence_sum",
    "objective_sum",
]
