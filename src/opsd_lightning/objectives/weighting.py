"""Per-token weights of the distillation objective.

The per-token objective is `l_i = w_i · D_i + g_i · KL(T‖S)_i`: `w_i ≥ 0` scales the divergence, `g_i ≥ 0`
adds a forward-KL term. The step's loss stays the token mean `Σ l_i / N` over its supervised tokens, so
weights of 1 (and no added term) give plain OPSD, number for number.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "EntropyGate",
    "NoWeighting",
    "PositionWeighting",
    "TokenFeatures",
    "TokenWeighting",
    "relative_position",
]


@dataclass(frozen=True)
class TokenFeatures:
    """What a weighting may read about each supervised token, all [N]."""

    position: Tensor  # 0-based index of the token in its completion
    length: Tensor  # number of tokens of its completion (EOS included)
    teacher_entropy: Tensor | None = None  # nats, of the tempered teacher distribution (when needed)

    def rows(self, index: slice) -> TokenFeatures:
        """The features of the tokens at `index` (e.g. one chunk)."""
        entropy = None if self.teacher_entropy is None else self.teacher_entropy[index]
        return TokenFeatures(self.position[index], self.length[index], entropy)

    def with_teacher_entropy(self, teacher_entropy: Tensor) -> TokenFeatures:
        return replace(self, teacher_entropy=teacher_entropy)


def relative_position(features: TokenFeatures, dtype: torch.dtype = torch.float32) -> Tensor:
    """u = position / (length − 1) in [0, 1]: 0 at a completion's first token, 1 at its last
    (0 for a completion of one token)."""
    span = (features.length - 1).clamp(min=1).to(dtype)
    return features.position.to(dtype) / span


class TokenWeighting(ABC):
    """How each token's divergence is weighted, and where a forward-KL term is added (`conf/weighting/`)."""

    # True: `features.teacher_entropy` must be filled before calling the methods below.
    needs_teacher_entropy: ClassVar[bool] = False

    @property
    def adds_forward_kl(self) -> bool:
        """Whether `forward_kl_weights` returns weights (the objective then needs full-width logits)."""
        return False

    @abstractmethod
    def divergence_weights(self, features: TokenFeatures) -> Tensor:
        """w_i ≥ 0 multiplying each token's divergence D_i, [N]."""

    def forward_kl_weights(self, features: TokenFeatures) -> Tensor | None:
        """g_i ≥ 0 of an added KL(T‖S) term, [N]; None: no such term."""
        return None


class NoWeighting(TokenWeighting):
    """Plain OPSD: every token's divergence counts once."""

    def divergence_weights(self, features: TokenFeatures) -> Tensor:
        return torch.ones(features.position.shape, dtype=torch.float32, device=features.position.device)


class PositionWeighting(TokenWeighting):
    """PW-OPSD: an increasing position weight, `w = (1 + slope·u) / (1 + slope/2)` with `u` the token's
    relative position (`relative_position`). Linear in u with mean 1 over each completion, so the loss
    scale does not change; `slope=0` is uniform, `slope > 0` weighs late tokens more. A completion of one
    token gets weight 1 (its mean)."""

    def __init__(self, slope: float = 1.0) -> None:
        # `not x > -1` also rejects NaN.
        if not (slope > -1 and math.isfinite(slope)):
            raise ValueError(f"weighting.slope={slope} must be > -1 (and finite); 0 is uniform")
        self.slope = slope

    def divergence_weights(self, features: TokenFeatures) -> Tensor:
        u = relative_position(features)
        weights = (1.0 + self.slope * u) / (1.0 + self.slope / 2.0)
        return torch.where(features.length > 1, weights, torch.ones_like(weights))


class EntropyGate(TokenWeighting):
    """Entropy-Aware OPD (Jin et al., 2026): the base divergence everywhere (published with reverse KL),
    plus `coef · KL(T‖S)` on tokens where the teacher's entropy exceeds `threshold` nats, so that where
    the teacher is unsure the student covers its modes instead of picking one."""

    needs_teacher_entropy: ClassVar[bool] = True

    def __init__(self, threshold: float = 1.0, coef: float = 1.0) -> None:
        if not (threshold >= 0 and math.isfinite(threshold)):
            raise ValueError(f"weighting.threshold={threshold} must be >= 0 nats (and finite)")
        if not (coef >= 0 and math.isfinite(coef)):
            raise ValueError(f"weighting.coef={coef} must be >= 0 (and finite); 0 turns the gate off")
        self.threshold = threshold
        self.coef = coef

    @property
    def adds_forward_kl(self) -> bool:
        return self.coef > 0

    def divergence_weights(self, features: TokenFeatures) -> Tensor:
        return torch.ones(features.position.shape, dtype=torch.float32, device=features.position.device)

    def forward_kl_weights(self, features: TokenFeatures) -> Tensor | None:
        if not self.adds_forward_kl:
            return None
        if features.teacher_entropy is None:
            raise ValueError("EntropyGate needs features.teacher_entropy")
        return self.coef * (features.teacher_entropy > self.threshold).to(torch.float32)
