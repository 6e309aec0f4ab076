"""Objective terms: the parts a training recipe sums. Each term reads a slice of episodes and returns the sum
of its per-token losses over the tokens it supervises, with that token mask; the training module adds the
terms' weighted sums and divides by the number of tokens any term supervised, over the whole optimizer step.

- `Distill`: a divergence between the teacher's and the student's next-token distributions (OPSD).
- `ClippedPolicy`: GRPO's clipped surrogate on group advantages, with RLSD's teacher-scaled advantages as an
  option.
- `KLToReference`: KL(π‖π_0) to the initial weights (k3 estimator).
- `NLL`: next-token loss on the episodes' completions (SFT on reference episodes).

Each term declares what it needs (`needs_teacher`, `needs_advantages`), so the module builds only that: no
teacher context and no teacher weights for a recipe whose terms need none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from opsd_lightning.contexts.batches import TokenBatch, build_scoring_batch
from opsd_lightning.models.scoring import causal_lm_parts, completion_hidden, completion_logits, output_layer
from opsd_lightning.objectives.chunked import chunked_objective_sum
from opsd_lightning.objectives.diagnostics import TokenDiagnostics
from opsd_lightning.objectives.divergences import Divergence
from opsd_lightning.objectives.objective import objective_sum
from opsd_lightning.objectives.policy_gradient import clipped_policy_loss, k3_kl
from opsd_lightning.objectives.settings import LossSettings
from opsd_lightning.objectives.weighting import TokenFeatures, TokenWeighting
from opsd_lightning.options import build_settings
from opsd_lightning.rollout.core import SamplingConfig
from opsd_lightning.teachers.modes import FixedTeacher, Teacher

if TYPE_CHECKING:
    from opsd_lightning.rollout.episodes import Episodes


@dataclass
class TermInputs:
    """One row slice of a step: the student model (with grad), its episodes, and, when a term needs them, the
    teacher and the teacher prompts of these rows with the rows that have one."""

    model: nn.Module
    episodes: Episodes
    teacher: Teacher | None = None
    teacher_prompt: TokenBatch | None = None
    teacher_rows: Tensor | None = None
    _student_logp: Tensor | None = field(default=None, repr=False)
    _student_logits: Tensor | None = field(default=None, repr=False)

    def student_token_logp(self) -> Tensor:
        """log π(token) of every completion position from the student's full logits `[rows, Lc]` (fp32, with
        grad), computed once per slice for all the terms that read it."""
        if self._student_logp is None:
            episodes = self.episodes
            batch = build_scoring_batch(episodes.prompt, episodes.completion_ids, episodes.completion_mask)
            logits = completion_logits(self.model, batch)
            if episodes.sampler_logprobs is not None:  # kept for `sampling_token_logp`, without grad
                self._student_logits = logits.detach()
            self._student_logp = token_log_probs(logits, episodes.completion_ids)
        return self._student_logp

    def sampling_token_logp(self, sampling: SamplingConfig) -> Tensor:
        """The trainer's log q(token) `[rows, Lc]` under `sampling`'s distribution (temperature, top-k,
        top-p), no grad: the engine's `sampler_logprobs` as the trainer's weights and numerics give them."""
        self.student_token_logp()
        return sampling.sampling_log_probs(self._student_logits, self.episodes.completion_ids)

    def teacher_mask(self) -> Tensor:
        """The supervised tokens of the rows that have a teacher context."""
        return self.episodes.loss_mask & self.teacher_rows[:, None]


def token_log_probs(logits: Tensor, token_ids: Tensor) -> Tensor:
    """log-softmax of `logits` (fp32) at `token_ids`: `[B, L, V], [B, L] -> [B, L]`."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


@dataclass
class TermSum:
    """A term's summed (unweighted) per-token losses over `mask`'s tokens, statistics to add up over the step
    (`sums`, divided by the term's own token count when logged), and distillation diagnostics."""

    loss_sum: Tensor
    mask: Tensor
    sums: dict[str, float] = field(default_factory=dict)
    diagnostics: TokenDiagnostics | None = None


class ObjectiveTerm(nn.Module):
    """A part of the objective: `weight x Σ per-token loss` over the tokens it supervises.

    `name`: its loss is logged as `train/<name>` (per token of its own). An `nn.Module`, so the state a term
    keeps (a frozen reference) moves to the device and is saved with the run.
    """

    name = "term"
    needs_teacher = False
    needs_advantages = False

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(
                f"algorithm.terms: {type(self).__name__}'s weight={weight} must be >= 0 (in the shipped "
                "recipes: algorithm.distill_weight, algorithm.reward_weight or algorithm.kl_coef)"
            )
        self.weight = float(weight)

    def attach(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called once with the student model, before training."""

    def forward(self, inputs: TermInputs) -> TermSum:
        raise NotImplementedError


class Distill(ObjectiveTerm):
    """Σ_i w_i·D(p_T ‖ p_S)_i + g_i·KL(T‖S)_i over the supervised tokens of the rows with a teacher context.

    Args:
        divergence: the per-token divergence (`conf/divergence/`).
        weighting: per-token weights and an optional added forward KL (`conf/weighting/`); None = none.
        loss: `backend` chunked (logits from hidden states, `chunk_size` positions at a time) or full_logits.
        diagnostics: also return `train/diag/...` sums (entropies, agreement, clip fraction, quarters).
        weight: the term's weight in the recipe's sum.
    """

    name = "divergence"
    needs_teacher = True

    def __init__(
        self,
        divergence: Divergence,
        weighting: TokenWeighting | None = None,
        loss: LossSettings | Mapping | None = None,
        diagnostics: bool = True,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        self.divergence = divergence
        self.weighting = weighting
        self.loss = build_settings(LossSettings, loss, "algorithm.loss")
        self.diagnostics = diagnostics

    def attach(self, model: nn.Module) -> None:
        head = output_layer(model)
        if head is not None:
            self.divergence.check_vocabulary(head.weight.shape[0])

    def forward(self, inputs: TermInputs) -> TermSum:
        mask = inputs.teacher_mask()
        episodes = inputs.episodes
        student_batch = build_scoring_batch(
            episodes.prompt, episodes.completion_ids, episodes.completion_mask
        )
        teacher_batch = build_scoring_batch(
            inputs.teacher_prompt, episodes.completion_ids, episodes.completion_mask
        )
        token_ids = episodes.completion_ids[mask]
        options = {
            "weighting": self.weighting,
            "features": completion_features(episodes.completion_mask, mask),
            "diagnostics": self.diagnostics,
        }
        if self.loss.backend == "full_logits":
            with inputs.teacher.scoring(inputs.model) as teacher:
                teacher_logits = completion_logits(teacher.model, teacher_batch)[mask]
            student_logits = completion_logits(inputs.model, student_batch)[mask]
            result = objective_sum(student_logits, teacher_logits, token_ids, self.divergence, **options)
            return TermSum(result.loss_sum, mask, diagnostics=result.diagnostics)
        # Hidden states, and logits a chunk of positions at a time: never [tokens, vocab] at once.
        _, head = causal_lm_parts(inputs.model)
        with inputs.teacher.scoring(inputs.model) as teacher:
            teacher_hidden = completion_hidden(teacher.model, teacher_batch)[mask]
        student_hidden = completion_hidden(inputs.model, student_batch)[mask]
        result = chunked_objective_sum(
            student_hidden,
            teacher_hidden,
            head.weight,
            token_ids,
            self.divergence,
            chunk_size=self.loss.chunk_size,
            bias=head.bias,
            teacher_weight=teacher.head_weight,
            teacher_bias=teacher.head_bias,
            **options,
        )
        return TermSum(result.loss_sum, mask, diagnostics=result.diagnostics)


def completion_features(completion_mask: Tensor, loss_mask: Tensor) -> TokenFeatures:
    """Each `loss_mask` token's 0-based position in its completion and its completion's length (EOS
    included), for the token weights and the diagnostics."""
    position = completion_mask.long().cumsum(dim=1) - 1
    length = completion_mask.long().sum(dim=1, keepdim=True).expand_as(position)
    return TokenFeatures(position=position[loss_mask], length=length[loss_mask])


def rlsd_weights(advantages: Tensor, log_ratio: Tensor, clip: float) -> Tensor:
    """RLSD's per-token weight w = exp(sign(A) * clamp(log_ratio, -clip, clip)), no gradient through it; the
    token's advantage becomes A * w.

    The reward fixes the sign; the teacher's log-ratio log pT(y) - log pS(y) only scales the magnitude: a
    token the teacher favours gets more credit in a correct rollout and less blame in a wrong one.
    """
    return torch.exp(torch.sign(advantages) * log_ratio.detach().clamp(-clip, clip))


POLICY_MODES = ("sum", "rlsd")


class ClippedPolicy(ObjectiveTerm):
    """GRPO's clipped surrogate −min(ρA, clip(ρ, 1−ε, 1+ε)A) on each supervised token, A its group's advantage
    (one policy update per rollout batch, so ρ = 1 and the gradient is −A·∇log π).

    Args:
        clip: ε of the clipped ratio, in (0, 1).
        mode: `sum`: the plain advantages (added to the other terms); `rlsd`: RLSD, each token's advantage
            scaled by exp(sign(A)·clamp(log pT(y) − log pS(y), ±log_ratio_clip)), the teacher scoring its own
            context (raw logits, no temperature).
        log_ratio_clip: RLSD's clamp c > 0, so a token's weight lies in [e^-c, e^c].
        weight: the term's weight in the recipe's sum (`algorithm.reward_weight` in the hybrid).
        importance_correction: multiply each token's loss by the truncated importance ratio
            min(exp(log π(y) − log q(y)), importance_cap), both without grad: π the trainer's sampling
            distribution, q the engine's (`Episodes.sampler_logprobs`). A no-op for episodes without sampler
            log-probs (`rollout=hf` samples with the trainer's own weights).
        importance_cap: the ratio's upper bound (> 0).
        sampling: the rollouts' sampling settings (`algorithm.sampling`), so π is scored under the same
            temperature / top-k / top-p as q; needed with sampler log-probs.

    With sampler log-probs it also returns, per token, `sampler_logprob_gap` Σ|log q − log π|,
    `sampler_kl` Σ(log q − log π) (k1 estimate of KL(q‖π): the tokens are drawn from q), both over the tokens
    inside the trainer's top-k/top-p set, `sampler_tokens_outside_trainer_set` (π = 0 there: ratio 0) and
    `importance_ratio` (the truncated ratio, whether applied or not).
    """

    name = "policy_loss"
    needs_advantages = True

    def __init__(
        self,
        clip: float = 0.2,
        mode: str = "sum",
        log_ratio_clip: float = 1.0,
        weight: float = 1.0,
        importance_correction: bool = True,
        importance_cap: float = 2.0,
        sampling: SamplingConfig | Mapping | None = None,
    ) -> None:
        super().__init__(weight)
        if not importance_cap > 0:
            raise ValueError(f"algorithm.importance_cap={importance_cap} must be > 0")
        self.importance_correction, self.importance_cap = importance_correction, importance_cap
        self._sampling = (  # the rollouts' settings (the module's), not an option of this term
            None if sampling is None else build_settings(SamplingConfig, sampling, "algorithm.sampling")
        )
        if not 0 < clip < 1:
            raise ValueError(f"algorithm.clip={clip} must be in (0, 1)")
        if mode not in POLICY_MODES:
            raise ValueError(f"algorithm.mode={mode!r}: use one of {list(POLICY_MODES)}")
        if not log_ratio_clip > 0:
            raise ValueError(f"algorithm.log_ratio_clip={log_ratio_clip} must be > 0")
        if mode == "rlsd" and self.weight == 0:
            raise ValueError(
                "algorithm.mode=rlsd with algorithm.reward_weight=0: RLSD's teacher only scales the reward "
                "term, so it would do nothing (use mode=sum for pure distillation)"
            )
        self.clip, self.mode, self.log_ratio_clip = clip, mode, log_ratio_clip
        self.needs_teacher = mode == "rlsd"

    def forward(self, inputs: TermInputs) -> TermSum:
        mask = inputs.episodes.loss_mask
        logp = inputs.student_token_logp()[mask]
        advantages = inputs.episodes.advantages[:, None].expand_as(mask)[mask]
        sums = {}
        if self.mode == "rlsd":
            weights = self.token_weights(inputs, mask, logp, advantages)
            advantages = advantages * weights
            sums["rlsd_weight"] = float(weights.sum())
        per_token = clipped_policy_loss(logp, logp.detach(), advantages, self.clip)
        if inputs.episodes.sampler_logprobs is not None:
            ratio = self.importance_ratio(inputs, mask, sums)
            if self.importance_correction:
                per_token = per_token * ratio
        return TermSum(per_token.sum(), mask, sums)

    def importance_ratio(self, inputs: TermInputs, mask: Tensor, sums: dict[str, float]) -> Tensor:
        """min(exp(log π − log q), cap) of each supervised token, and the mismatch statistics into `sums`."""
        if self._sampling is None:
            raise ValueError(
                "ClippedPolicy: the episodes carry the engine's sampler log-probs but the term has no "
                "sampling settings to score them with (sampling=${algorithm.sampling}, as in conf/algorithm/)"
            )
        trainer_logp = inputs.sampling_token_logp(self._sampling)[mask]
        sampler_logp = inputs.episodes.sampler_logprobs[mask]
        ratio = truncated_importance_ratio(trainer_logp, sampler_logp, self.importance_cap)
        # A token the engine sampled outside the trainer's top-k/top-p set has π = 0: ratio 0, counted apart.
        inside = torch.isfinite(trainer_logp)
        difference = torch.where(inside, sampler_logp - trainer_logp, 0.0)
        sums["sampler_logprob_gap"] = float(difference.abs().sum())
        sums["sampler_kl"] = float(difference.sum())
        sums["sampler_tokens_outside_trainer_set"] = float((~inside).sum())
        sums["importance_ratio"] = float(ratio.sum())
        return ratio

    def token_weights(self, inputs: TermInputs, mask: Tensor, logp: Tensor, advantages: Tensor) -> Tensor:
        """RLSD's weight of each supervised token; a row without a teacher context keeps its advantage."""
        episodes = inputs.episodes
        batch = build_scoring_batch(inputs.teacher_prompt, episodes.completion_ids, episodes.completion_mask)
        with torch.no_grad(), inputs.teacher.scoring(inputs.model) as teacher:
            teacher_logp = token_log_probs(completion_logits(teacher.model, batch), episodes.completion_ids)
        has_context = inputs.teacher_rows[:, None].expand_as(mask)[mask]
        log_ratio = torch.where(has_context, teacher_logp[mask] - logp.detach(), 0.0)
        return rlsd_weights(advantages, log_ratio, self.log_ratio_clip)


def truncated_importance_ratio(trainer_logp: Tensor, sampler_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling: min(exp(log π − log q), cap), no gradient (1 where they agree)."""
    return torch.exp(trainer_logp.detach() - sampler_logp).clamp(max=cap)


class KLToReference(ObjectiveTerm):
    """k3 estimate of KL(π‖π_0) per supervised token, π_0 the initial weights (kept frozen, or the base under
    LoRA adapters). The recipe's `kl_coef` is this term's weight."""

    name = "kl_to_reference"

    def __init__(self, weight: float = 0.0) -> None:
        super().__init__(weight)
        self.reference = FixedTeacher()

    def attach(self, model: nn.Module) -> None:
        self.reference.attach(model)

    def forward(self, inputs: TermInputs) -> TermSum:
        episodes, mask = inputs.episodes, inputs.episodes.loss_mask
        # Attend to every completion token (a multi-turn episode's tool responses too); score the supervised.
        batch = build_scoring_batch(episodes.prompt, episodes.completion_ids, episodes.completion_mask)
        with self.reference.scoring(inputs.model) as reference:
            reference_logp = token_log_probs(
                completion_logits(reference.model, batch), episodes.completion_ids
            )
        return TermSum(k3_kl(inputs.student_token_logp()[mask], reference_logp[mask]).sum(), mask)


class NLL(ObjectiveTerm):
    """−log π(token) of every supervised completion token (SFT, with the reference sampler's episodes; in a
    multi-turn episode, the model's tokens and not the environment's)."""

    name = "nll"

    def forward(self, inputs: TermInputs) -> TermSum:
        mask = inputs.episodes.loss_mask
        return TermSum(-inputs.student_token_logp()[mask].sum(), mask)
