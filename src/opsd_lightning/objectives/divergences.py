"""Per-token divergences between the teacher's and the student's next-token distributions.

Every divergence maps `student_logits [N, V]`, `teacher_logits [N, V]` and the sampled `token_ids [N]`
to one value per token `[N]`. The reduction to a loss (mean over every completion token of an optimizer
step) happens elsewhere; `masked_token_sum` gives the two pieces it needs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = [
    "Divergence",
    "ForwardKL",
    "GeneralizedJSD",
    "ReverseKL",
    "SampledToken",
    "TopK",
    "masked_token_sum",
]


def _validate_temperature_and_clip(temperature: float, clip: float | None) -> None:
    # `not x > 0` also rejects NaN.
    if not temperature > 0:
        raise ValueError(f"divergence.temperature must be > 0, got {temperature}")
    if clip is not None and not clip > 0:
        raise ValueError(f"divergence.clip must be > 0 or null (no clipping), got {clip}")


CLIP_MODES = ("entry", "token")


def _validate_clip_mode(clip_mode: str) -> None:
    if clip_mode not in CLIP_MODES:
        raise ValueError(
            f"divergence.clip_mode={clip_mode!r}: use 'entry' (each vocabulary entry's term capped at clip) "
            "or 'token' (the token's whole divergence capped at clip)"
        )


def _kl_terms(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """Per-vocabulary-entry terms of KL(p‖q): p · (log p − log q), 0 where p is 0."""
    return p_logp.exp() * (p_logp - q_logp)


class Divergence(ABC):
    """A per-token divergence `D(p_T ‖ p_S)`; gradients flow only into the student logits.

    Both logits are divided by `temperature` before the softmax and upcast to at least float32 inside,
    so a bf16 teacher gives a float32 result. `clip` (None = off) damps spikes; each subclass says where.
    """

    # True when the divergence reads the teacher's whole distribution at every position.
    needs_full_teacher_logits: bool = True

    def __init__(self, temperature: float = 1.0, clip: float | None = None) -> None:
        _validate_temperature_and_clip(temperature, clip)
        self.temperature = temperature
        self.clip = clip

    def check_vocabulary(self, vocabulary: int) -> None:  # noqa: B027 - most divergences fit any vocabulary
        """Raise if this divergence cannot apply to a model with `vocabulary` tokens (e.g. top-k, k > V)."""

    @abstractmethod
    def per_token(self, student_logits: Tensor, teacher_logits: Tensor, token_ids: Tensor) -> Tensor:
        """Divergence at each of the N positions, shape [N]."""

    def clipped(self, student_logits: Tensor, teacher_logits: Tensor, token_ids: Tensor) -> Tensor:
        """Bool [N]: where `clip` changed the token's value (all False without a clip). No gradient."""
        if self.clip is None:
            return torch.zeros(student_logits.shape[:1], dtype=torch.bool, device=student_logits.device)
        raise NotImplementedError(f"{type(self).__name__} does not say where its clip acts")

    def _log_probs(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Tempered log-probabilities (student, detached teacher), floored so that -inf stays finite."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                f"{tuple(teacher_logits.shape)} must have the same shape [N, V]"
            )
        # At least float32 (bf16 log-probs are too coarse); float64 stays float64, e.g. for gradcheck.
        dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
        dtype = torch.promote_types(dtype, torch.float32)
        # A finite floor instead of -inf: an entry masked in both (-inf − -inf) would otherwise turn into
        # NaN, in the value and through the backward of the zero-weighted branch.
        floor = torch.finfo(dtype).min
        student_logp = torch.log_softmax(student_logits.to(dtype) / self.temperature, dim=-1).clamp(min=floor)
        teacher_logp = torch.log_softmax(teacher_logits.detach().to(dtype) / self.temperature, dim=-1)
        return student_logp, teacher_logp.clamp(min=floor)


class _VocabularyDivergence(Divergence):
    """A divergence that sums one term per vocabulary entry.

    `clip_mode` says what `clip` caps: `entry` (default) caps each entry's term before the sum, so a few
    style tokens cannot dominate a position (and a token's value can go below 0); `token` caps the sum.
    """

    def __init__(self, temperature: float = 1.0, clip: float | None = None, clip_mode: str = "entry") -> None:
        super().__init__(temperature=temperature, clip=clip)
        _validate_clip_mode(clip_mode)
        self.clip_mode = clip_mode

    @abstractmethod
    def _terms(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        """Per-vocabulary-entry terms [N, V] whose sum over V is the divergence."""

    def reduce_terms(self, terms: Tensor) -> Tensor:
        """The per-token value [N] of per-entry terms [N, E], with the clip applied as `clip_mode` says."""
        if self.clip is None:
            return terms.sum(dim=-1)
        if self.clip_mode == "entry":
            return terms.clamp(max=self.clip).sum(dim=-1)
        return terms.sum(dim=-1).clamp(max=self.clip)

    def clipped_terms(self, terms: Tensor) -> Tensor:
        """Bool [N]: where the clip changes the value of these per-entry terms [N, E]."""
        if self.clip is None:
            return torch.zeros(terms.shape[:1], dtype=torch.bool, device=terms.device)
        if self.clip_mode == "entry":
            return (terms > self.clip).any(dim=-1)
        return terms.sum(dim=-1) > self.clip

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor, token_ids: Tensor) -> Tensor:
        return self.reduce_terms(self._terms(*self._log_probs(student_logits, teacher_logits)))

    def clipped(self, student_logits: Tensor, teacher_logits: Tensor, token_ids: Tensor) -> Tensor:
        if self.clip is None:
            return super().clipped(student_logits, teacher_logits, token_ids)
        with torch.no_grad():
            return self.clipped_terms(self._terms(*self._log_probs(student_logits.detach(), teacher_logits)))

    def terms_from_log_probs(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        """Per-entry terms [N, E] of already normalised log-probabilities (e.g. top-k plus a tail bucket)."""
        return self._terms(student_logp, teacher_logp)


class ForwardKL(_VocabularyDivergence):
    """Forward KL, `KL(T‖S) = Σ_v pT (log pT − log pS)`: mass-covering, the paper's best ablation."""

    def _terms(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return _kl_terms(teacher_logp, student_logp)


class ReverseKL(_VocabularyDivergence):
    """Reverse KL, `KL(S‖T) = Σ_v pS (log pS − log pT)`: mode-seeking."""

    def _terms(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return _kl_terms(student_logp, teacher_logp)


class GeneralizedJSD(_VocabularyDivergence):
    """Generalized Jensen-Shannon divergence `β·KL(T‖M) + (1−β)·KL(S‖M)` with `M = β·pT + (1−β)·pS`.

    Following the GKD / TRL convention, β=0 is defined as forward KL `KL(T‖S)` and β=1 as reverse KL
    `KL(S‖T)` (the formula itself would give 0 at both ends). Swapping teacher and student maps β to 1−β.
    """

    def __init__(
        self, beta: float = 0.5, temperature: float = 1.0, clip: float | None = None, clip_mode: str = "entry"
    ) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(
                f"divergence.beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}"
            )
        super().__init__(temperature=temperature, clip=clip, clip_mode=clip_mode)
        self.beta = beta

    def _terms(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        if self.beta == 0.0:
            return _kl_terms(teacher_logp, student_logp)
        if self.beta == 1.0:
            return _kl_terms(student_logp, teacher_logp)
        # log M in log space: β·pT + (1−β)·pS would underflow where both probabilities are tiny.
        mixture_logp = torch.logaddexp(
            teacher_logp + math.log(self.beta), student_logp + math.log(1.0 - self.beta)
        )
        teacher_terms = _kl_terms(teacher_logp, mixture_logp)
        student_terms = _kl_terms(student_logp, mixture_logp)
        return self.beta * teacher_terms + (1.0 - self.beta) * student_terms


class SampledToken(Divergence):
    """Policy-gradient reverse KL on the sampled token only, with O(1) memory per token.

    With `s = log pS(ŷ)` and `t = log pT(ŷ)` the advantage is `A = t − s` (detached, clamped to
    `[−clip, clip]` when `clip` is set). The returned value is `−A`, i.e. the single-sample estimate
    `s − t` of `KL(S‖T)`, which is what is worth logging; its gradient is that of the paper's loss
    `−A·log pS(ŷ)`, which the value itself (a detached number) could not carry.
    """

    # Only log pT(ŷ) is read from the teacher, so nothing vocabulary-wide from it is needed later
    # (a caller may reduce teacher logits chunk by chunk or free them straight away).
    needs_full_teacher_logits = False

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor, token_ids: Tensor) -> Tensor:
        student_logp, teacher_logp = self._log_probs(student_logits, teacher_logits)
        index = token_ids.long().unsqueeze(-1)
        student_token_logp = student_logp.gather(-1, index).squeeze(-1)
        teacher_token_logp = teacher_logp.gather(-1, index).squeeze(-1)
        advantage = (teacher_token_logp - student_token_logp).detach()
        if self.clip is not None:
            advantage = advantage.clamp(min=-self.clip, max=self.clip)
        # Value −A (the zero-valued second term adds nothing), gradient −A·∇s.
        return -advantage - advantage * (student_token_logp - student_token_logp.detach())

    def clipped(self, student_logits: Tensor, teacher_logits: Tensor, token_ids: Tensor) -> Tensor:
        if self.clip is None:
            return super().clipped(student_logits, teacher_logits, token_ids)
        with torch.no_grad():
            student_logp, teacher_logp = self._log_probs(student_logits.detach(), teacher_logits)
            index = token_ids.long().unsqueeze(-1)
            advantage = (teacher_logp.gather(-1, index) - student_logp.gather(-1, index)).squeeze(-1)
            return advantage.abs() > self.clip


class TopK(Divergence):
    """Apply `base` to the teacher's top-`k` vocabulary entries only.

    `tail=False`: both distributions restricted to those k entries and renormalised; with `k ≥ V` this is
    the base on the full vocabulary. `tail=True` (as TRL's GOLD/GKD and verl do): the k entries of the
    tempered full-vocabulary distributions, not renormalised, plus one bucket per distribution holding the
    rest of its mass, so k+1 entries that sum to 1 each (needs k < V). The selection is made on raw teacher
    logits; dividing by a positive temperature keeps the order. `temperature`, `clip` and `clip_mode` are
    the base's.
    """

    def __init__(self, base: Divergence, k: int = 20, tail: bool = False) -> None:
        if k < 1:
            raise ValueError(f"divergence.k must be >= 1, got {k}")
        if not base.needs_full_teacher_logits:
            raise ValueError(
                f"TopK needs a vocabulary-wide base divergence; {type(base).__name__} (e.g. SampledToken) "
                "only reads the sampled token"
            )
        if tail and not isinstance(base, _VocabularyDivergence):
            raise ValueError(
                f"divergence.tail=true needs a base that sums per-entry terms (ForwardKL, ReverseKL, "
                f"GeneralizedJSD), not {type(base).__name__}"
            )
        self.base = base
        self.k = k
        self.tail = tail

    def check_vocabulary(self, vocabulary: int) -> None:
        if self.k > vocabulary:
            raise ValueError(
                f"divergence.k={self.k} exceeds the model's vocabulary of {vocabulary} tokens; "
                f"use 1 <= divergence.k <= {vocabulary}"
            )
        if self.tail and self.k >= vocabulary:
            raise ValueError(
                f"divergence.k={self.k} with divergence.tail=true leaves no tail entries in the model's "
                f"vocabulary of {vocabulary} tokens; use divergence.k < {vocabulary} or divergence.tail=false"
            )

    @property
    def temperature(self) -> float:
        return self.base.temperature

    @property
    def clip(self) -> float | None:
        return self.base.clip

    @property
    def clip_mode(self) -> str:
        return getattr(self.base, "clip_mode", "entry")

    def tail_log_probs(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """[N, k+1] log-probabilities (student, detached teacher): the teacher's top-k entries of the tempered
        full-vocabulary distributions, then each one's tail log-mass (a logsumexp, not log(1 − Σ top-k))."""
        self.check_vocabulary(teacher_logits.shape[-1])
        student_logp, teacher_logp = self.base._log_probs(student_logits, teacher_logits)
        top_indices = teacher_logits.detach().topk(self.k, dim=-1).indices
        in_top = torch.zeros_like(teacher_logp, dtype=torch.bool).scatter_(-1, top_indices, True)
        floor = torch.finfo(teacher_logp.dtype).min

        def with_tail(logp: Tensor) -> Tensor:
            tail = logp.masked_fill(in_top, -math.inf).logsumexp(dim=-1, keepdim=True)
            return torch.cat([logp.gather(-1, top_indices), tail.clamp(min=floor)], dim=-1)

        return with_tail(student_logp), with_tail(teacher_logp)

    def _tail_terms(
        self, student_logits: Tensor, teacher_logits: Tensor
    ) -> tuple[_VocabularyDivergence, Tensor]:
        """The base (a vocabulary divergence, checked in __init__) and its terms on the k+1 entries."""
        base = self.base
        assert isinstance(base, _VocabularyDivergence)
        return base, base.terms_from_log_probs(*self.tail_log_probs(student_logits, teacher_logits))

    def _restrict(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Both logits at the teacher's top-k entries (all of them when k ≥ V)."""
        if self.k >= teacher_logits.shape[-1]:
            return student_logits, teacher_logits
        top_indices = teacher_logits.detach().topk(self.k, dim=-1).indices
        return student_logits.gather(-1, top_indices), teacher_logits.gather(-1, top_indices)

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor, token_ids: Tensor) -> Tensor:
        if self.tail:
            base, terms = self._tail_terms(student_logits, teacher_logits)
            return base.reduce_terms(terms)
        return self.base.per_token(*self._restrict(student_logits, teacher_logits), token_ids)

    def clipped(self, student_logits: Tensor, teacher_logits: Tensor, token_ids: Tensor) -> Tensor:
        if self.tail:
            with torch.no_grad():
                base, terms = self._tail_terms(student_logits.detach(), teacher_logits)
                return base.clipped_terms(terms)
        return self.base.clipped(*self._restrict(student_logits, teacher_logits), token_ids)


def masked_token_sum(per_token: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of `per_token` where `mask` is True (float32 scalar) and the number of such tokens (long scalar).

    Sum and count stay separate so the mean can be taken over a whole optimizer step, not per micro-batch.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must match")
    mask = mask.bool()
    # `where`, not a product: a masked-out inf or NaN (e.g. a padding position) must not leak in.
    total = torch.where(mask, per_token.float(), 0.0).sum()
    return total, mask.sum()
