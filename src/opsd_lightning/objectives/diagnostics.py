"""Distillation diagnostics: what the teacher and the student distributions look like on the trained tokens.

Computed without grad from the same (tempered) logits the loss sees, one slice of tokens at a time, and
kept as sums so that slices, chunks and micro-batches add up; `TokenDiagnostics.means()` gives what is
logged (`train/diag/...`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from opsd_lightning.objectives.weighting import TokenFeatures, relative_position

__all__ = [
    "DIAGNOSTIC_KEYS",
    "QUARTER_DIAGNOSTIC_KEYS",
    "SCALAR_DIAGNOSTIC_KEYS",
    "STUDENT_TOP_K",
    "DistributionStats",
    "TokenDiagnostics",
    "distribution_stats",
    "entropy",
    "token_diagnostics",
]

# How many of the student's most likely tokens `teacher_mass_on_student_topk` reads (V if smaller).
STUDENT_TOP_K = 20
QUARTERS = 4
# The logged names (`train/<key>` once the module logs them; `opsd-report` reads them from here).
SCALAR_DIAGNOSTIC_KEYS = (
    "diag/teacher_entropy",
    "diag/student_entropy",
    "diag/top1_agreement",
    "diag/teacher_mass_on_student_topk",
    "diag/clip_fraction",
)
QUARTER_DIAGNOSTIC_KEYS = tuple(f"diag/divergence_q{quarter + 1}" for quarter in range(QUARTERS))
DIAGNOSTIC_KEYS = (*SCALAR_DIAGNOSTIC_KEYS, *QUARTER_DIAGNOSTIC_KEYS)


def _tempered_log_probs(logits: Tensor, temperature: float) -> Tensor:
    """Tempered log-softmax in at least float32 (no grad), floored so that a -inf logit gives 0 · floor = 0
    entropy terms (`torch.special.entr` would too, but is several times slower on CPU)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    scaled = logits.detach().to(dtype)
    scaled = scaled if temperature == 1.0 else scaled / temperature
    return torch.log_softmax(scaled, dim=-1).clamp_(min=torch.finfo(dtype).min)


def _entropy_and_probs(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    logp = _tempered_log_probs(logits, temperature)
    probs = logp.exp()
    return -(probs * logp).sum(dim=-1), probs


def entropy(logits: Tensor, temperature: float) -> Tensor:
    """Entropy in nats of each row's tempered distribution, [N] (no grad)."""
    with torch.no_grad():
        return _entropy_and_probs(logits, temperature)[0]


@dataclass(frozen=True)
class DistributionStats:
    """Per-token [N] statistics of the two tempered distributions."""

    teacher_entropy: Tensor
    student_entropy: Tensor
    top1_agreement: Tensor  # bool: the two argmaxes agree
    teacher_mass_on_student_topk: Tensor


def distribution_stats(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> DistributionStats:
    """`DistributionStats` of full-vocabulary logits [N, V] (no grad). A few passes over [N, V]: softmax,
    entropy, one top-k and one argmax; the order of logits is the order of their tempered probabilities."""
    with torch.no_grad():
        student_entropy, _ = _entropy_and_probs(student_logits, temperature)
        teacher_entropy, teacher_p = _entropy_and_probs(teacher_logits, temperature)
        k = min(STUDENT_TOP_K, student_logits.shape[-1])
        student_top = student_logits.detach().topk(k, dim=-1).indices  # sorted: column 0 is the argmax
        return DistributionStats(
            teacher_entropy=teacher_entropy,
            student_entropy=student_entropy,
            top1_agreement=student_top[:, 0] == teacher_logits.detach().argmax(dim=-1),
            teacher_mass_on_student_topk=teacher_p.gather(-1, student_top).sum(dim=-1),
        )


@dataclass(frozen=True)
class TokenDiagnostics:
    """Float64 sums over tokens (0-dim tensors; the quarters [4]). `+` adds two; `means()` for logging."""

    tokens: Tensor
    teacher_entropy: Tensor
    student_entropy: Tensor
    top1_agreement: Tensor
    teacher_mass_on_student_topk: Tensor
    clipped: Tensor  # tokens whose value the clip changed
    divergence_by_quarter: Tensor  # Σ D_i over the tokens of each position quarter q1..q4
    tokens_by_quarter: Tensor

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> TokenDiagnostics:
        """The sums of no tokens."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        quarters = torch.zeros(QUARTERS, dtype=torch.float64, device=device)
        return cls(zero, zero, zero, zero, zero, zero, quarters, quarters)

    def __add__(self, other: TokenDiagnostics) -> TokenDiagnostics:
        return TokenDiagnostics(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def means(self) -> dict[str, float]:
        """Means per token under `DIAGNOSTIC_KEYS`; a quarter without tokens (or everything, without any
        token) is left out rather than logged as 0."""
        tokens = float(self.tokens)
        if tokens == 0:
            return {}
        sums = (
            self.teacher_entropy,
            self.student_entropy,
            self.top1_agreement,
            self.teacher_mass_on_student_topk,
            self.clipped,
        )
        means = {key: float(total) / tokens for key, total in zip(SCALAR_DIAGNOSTIC_KEYS, sums, strict=True)}
        quarters = zip(self.divergence_by_quarter.tolist(), self.tokens_by_quarter.tolist(), strict=True)
        for key, (total, count) in zip(QUARTER_DIAGNOSTIC_KEYS, quarters, strict=True):
            if count > 0:
                means[key] = total / count
        return means


def _position_quarter(features: TokenFeatures) -> Tensor:
    """0..3: the quarter of its completion a token is in, u in [0, .25) ... [.75, 1]."""
    u = relative_position(features, torch.float64)
    return (u * QUARTERS).floor().long().clamp(0, QUARTERS - 1)


def token_diagnostics(
    stats: DistributionStats, values: Tensor, clipped: Tensor, features: TokenFeatures | None
) -> TokenDiagnostics:
    """The sums of some tokens' diagnostics: `values` their divergences D_i [N], `clipped` where the clip
    changed D_i [N]; without `features` (no positions known) the quarters stay empty."""
    with torch.no_grad():
        device, dtype = values.device, torch.float64
        quarter_sums = torch.zeros(QUARTERS, dtype=dtype, device=device)
        quarter_counts = torch.zeros(QUARTERS, dtype=dtype, device=device)
        if features is not None:
            quarter = _position_quarter(features)
            quarter_sums.index_add_(0, quarter, values.detach().to(dtype))
            quarter_counts.index_add_(0, quarter, torch.ones_like(quarter, dtype=dtype))
        return TokenDiagnostics(
            tokens=torch.tensor(float(values.shape[0]), dtype=dtype, device=device),
            teacher_entropy=stats.teacher_entropy.to(dtype).sum(),
            student_entropy=stats.student_entropy.to(dtype).sum(),
            top1_agreement=stats.top1_agreement.to(dtype).sum(),
            teacher_mass_on_student_topk=stats.teacher_mass_on_student_topk.to(dtype).sum(),
            clipped=clipped.to(dtype).sum(),
            divergence_by_quarter=quarter_sums,
            tokens_by_quarter=quarter_counts,
        )
