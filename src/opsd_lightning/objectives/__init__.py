"""Objectives: the terms a recipe sums (`terms`), and below them per-token divergences, token weights,
diagnostics and the full-logits and chunked kernels."""

from opsd_lightning.objectives.chunked import (
    chunked_divergence_sum,
    chunked_objective_sum,
    naive_divergence_sum,
)
from opsd_lightning.objectives.diagnostics import DIAGNOSTIC_KEYS, TokenDiagnostics
from opsd_lightning.objectives.divergences import (
    Divergence,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SampledToken,
    TopK,
    masked_token_sum,
)
from opsd_lightning.objectives.objective import ObjectiveSum, objective_sum
from opsd_lightning.objectives.settings import LossSettings
from opsd_lightning.objectives.terms import (
    NLL,
    ClippedPolicy,
    Distill,
    KLToReference,
    ObjectiveTerm,
    TermInputs,
    TermSum,
)
from opsd_lightning.objectives.weighting import (
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
