"""The hybrid of a verifiable reward and the self-teacher: GRPO's groups and graded rewards, with OPSD's
privileged teacher on the same rollouts.

micro_batch_loss, per batch of B problems (see `PolicyModule` for the step-level reduction):
    G rollouts per problem from the student context -> binary rewards -> group-normalised advantages A
    teacher context per group: the reference solution, or the group's shortest correct rollout (SSOPD)
    then per `micro_batch_size` rows, on every supervised completion token:
        mode=sum  (SDPO-style): reward_weight * clipped surrogate(A) + distill_weight * divergence
        mode=rlsd (RLSD):       reward_weight * clipped surrogate(A * w) + distill_weight * divergence,
                                w = exp(sign(A) * clamp(sg(log pT(y) - log pS(y)), -c, c))

The policy term takes log-probs from the student's full logits, as GRPO does: `[rows, Lc, V]` logits plus
their fp32 log-softmax kept for backward (about 10 bytes per row x completion position x vocabulary entry;
6 GB per 4096-token row of a 152k vocabulary), bounded by `micro_batch_size`. RLSD adds the teacher's full
logits for the same rows, without gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from opsd_lightning.algorithms.base import MicroBatchLoss
from opsd_lightning.algorithms.groups import (
    GroupedRollouts,
    policy_log_probs,
    repeat_rows,
    rollout_stats,
    sample_groups,
    token_log_probs,
)
from opsd_lightning.algorithms.opsd import OPSDModule
from opsd_lightning.algorithms.settings import GroupSettings, HybridSettings
from opsd_lightning.batches import TokenBatch, build_scoring_batch, left_pad
from opsd_lightning.losses.policy_gradient import clipped_policy_loss
from opsd_lightning.scoring import completion_logits


def rlsd_weights(advantages: torch.Tensor, log_ratio: torch.Tensor, clip: float) -> torch.Tensor:
    """RLSD's per-token weight w = exp(sign(A) * clamp(log_ratio, -clip, clip)), no gradient through it; the
    token's advantage becomes A * w.

    The reward fixes the sign; the teacher's log-ratio log pT(y) - log pS(y) only scales the magnitude: a
    token the teacher favours gets more credit in a correct rollout and less blame in a wrong one.
    """
    return torch.exp(torch.sign(advantages) * log_ratio.detach().clamp(-clip, clip))


def shortest_correct(rewards: torch.Tensor, lengths: torch.Tensor, group_size: int) -> list[int | None]:
    """Per group (consecutive runs of `group_size` rows), the row of its shortest rollout with reward 1
    (the first one on a tie), or None when no rollout of the group is correct."""
    chosen: list[int | None] = []
    for start in range(0, len(rewards), group_size):
        correct = [row for row in range(start, start + group_size) if rewards[row] > 0]
        chosen.append(min(correct, key=lambda row: (int(lengths[row]), row)) if correct else None)
    return chosen


@dataclass
class TeacherContext:
    """The teacher prompt of every row, which rows have one (the others leave the distillation), stats."""

    prompt: TokenBatch
    rows: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class SliceTerms:
    """One row slice's summed policy and distillation terms (None when its weight is 0)."""

    policy: torch.Tensor | None = None
    distill: torch.Tensor | None = None
    diagnostics: object | None = None
    rlsd_weight_sum: float = 0.0


class HybridModule(OPSDModule):
    """GRPO's verifiable reward and OPSD's self-teacher on the same group rollouts.

    Args (beyond `OPSDModule`'s, whose divergence, teacher, loss backend, micro-batches, `mask_truncated`
    and `reason_first` (reference context only) apply to the distillation term as they do in OPSD):
        group_size: rollouts per problem (G >= 2); advantages are normalised within each group.
        clip: ε of the clipped ratio.
        mode: `sum` or `rlsd` (see the module docstring).
        reward_weight / distill_weight: the two terms' weights (>= 0, not both 0; rlsd needs the first > 0).
        log_ratio_clip: RLSD's clamp c on the teacher-student log-ratio, so a token's weight lies in
            [e^-c, e^c] (1.0: at most 2.7x more or less credit).
        privileged_context: `reference` (the dataset's solution) or `own_rollout` (the group's shortest
            correct rollout, its token ids verbatim; no reference needed).
        no_correct_rollout: own_rollout only; a group with no correct rollout leaves the distillation loss
            (`skip`) or is taught with the reference (`reference`). Logged as `groups_without_correct`.
    """

    flat_settings = (*OPSDModule.flat_settings, GroupSettings, HybridSettings)

    def __init__(
        self,
        *args,
        group_size: int = 4,
        clip: float = 0.2,
        mode: str = "sum",
        reward_weight: float = 1.0,
        distill_weight: float = 1.0,
        log_ratio_clip: float = 1.0,
        privileged_context: str = "reference",
        no_correct_rollout: str = "skip",
        **kwargs,
    ) -> None:
        groups = GroupSettings(group_size, clip)
        settings = HybridSettings(
            mode, reward_weight, distill_weight, log_ratio_clip, privileged_context, no_correct_rollout
        )
        super().__init__(*args, **kwargs)
        self.group_size, self.clip, self.settings = groups.group_size, groups.clip, settings
        if settings.privileged_context == "own_rollout" and self.reason_first:
            raise ValueError(
                "algorithm.reason_first=true explains a reference: use it with "
                "algorithm.privileged_context=reference, not own_rollout"
            )
        if settings.privileged_context == "own_rollout" and not self.teacher.privileged_context:
            raise ValueError(
                "algorithm.privileged_context=own_rollout needs a teacher that reads a privileged context; "
                f"this teacher ({type(self.teacher).__name__}) scores the student's own prompt"
            )

    @property
    def needs_teacher(self) -> bool:
        return self.settings.distill_weight > 0 or self.settings.mode == "rlsd"

    def micro_batch_loss(self, batch: Mapping, micro_index: int) -> MicroBatchLoss:
        groups = sample_groups(self, batch, self.group_size, micro_index, algorithm="hybrid")
        rollout = groups.rollout
        loss_mask = rollout.completion_mask
        if self.mask_truncated:
            loss_mask = loss_mask & ~rollout.truncated[:, None]
        context = self.teacher_context(batch, groups, micro_index) if self.needs_teacher else None
        distill_mask = loss_mask & context.rows[:, None] if context is not None else None
        slices = self.row_slices(len(rollout.completion_ids))
        totals = {"loss": torch.zeros((), device=self.device), "policy": 0.0, "distill": 0.0, "weight": 0.0}
        diagnostics = None
        for rows in slices:
            terms = self.slice_terms(groups, context, rows, loss_mask, distill_mask)
            part = self.combine(terms)
            if len(slices) > 1:
                with self.gradient_sync(rows is slices[-1]):
                    self.manual_backward(part)  # frees this slice's graph before the next one
                part = part.detach()
            totals["loss"] = totals["loss"] + part
            totals["policy"] += float(terms.policy.detach()) if terms.policy is not None else 0.0
            totals["distill"] += float(terms.distill.detach()) if terms.distill is not None else 0.0
            totals["weight"] += terms.rlsd_weight_sum
            if terms.diagnostics is not None:
                diagnostics = terms.diagnostics if diagnostics is None else diagnostics + terms.diagnostics
        supervised = self.supervised_mask(loss_mask, distill_mask)
        stats = {**rollout_stats(groups), **self.term_stats(totals, loss_mask, distill_mask)}
        if context is not None:
            stats.update(context.stats)
        if diagnostics is not None:
            stats.update(diagnostics.means())
        return MicroBatchLoss(
            loss_sum=totals["loss"],
            num_tokens=supervised.sum().cpu(),
            stats=stats,
            backward_done=len(slices) > 1,
        )

    def combine(self, terms: SliceTerms) -> torch.Tensor:
        """reward_weight * policy + distill_weight * distillation, each term present only if weighted."""
        parts = []
        if terms.policy is not None:
            parts.append(self.settings.reward_weight * terms.policy)
        if terms.distill is not None:
            parts.append(self.settings.distill_weight * terms.distill)
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def supervised_mask(self, loss_mask: torch.Tensor, distill_mask: torch.Tensor | None) -> torch.Tensor:
        """The tokens the loss averages over: the loss tokens if the reward is on, and the distilled ones."""
        policy = loss_mask if self.settings.reward_weight > 0 else torch.zeros_like(loss_mask)
        if self.settings.distill_weight > 0:
            return policy | distill_mask
        return policy

    def term_stats(
        self, totals: dict[str, float], loss_mask: torch.Tensor, distill_mask: torch.Tensor | None
    ) -> dict[str, float]:
        """Each term per token of its own (unweighted), and RLSD's mean token weight."""
        stats = {}
        num_policy = max(int(loss_mask.sum()), 1)
        if self.settings.reward_weight > 0:
            stats["policy_loss"] = totals["policy"] / num_policy
        if self.settings.distill_weight > 0:
            stats["distill_loss"] = totals["distill"] / max(int(distill_mask.sum()), 1)
        if self.settings.mode == "rlsd":
            stats["rlsd_weight"] = totals["weight"] / num_policy
        return stats

    def slice_terms(
        self,
        groups: GroupedRollouts,
        context: TeacherContext | None,
        rows: slice,
        loss_mask: torch.Tensor,
        distill_mask: torch.Tensor | None,
    ) -> SliceTerms:
        """The weighted terms' sums over these rows (the student's graph kept for backward)."""
        terms = SliceTerms()
        rollout = groups.rollout
        if self.settings.distill_weight > 0:
            result = self.divergence_sum(
                groups.prompt.rows(rows),
                context.prompt.rows(rows),
                rollout.completion_ids[rows],
                rollout.completion_mask[rows],
                distill_mask[rows],
            )
            terms.distill, terms.diagnostics = result.loss_sum, result.diagnostics
        if self.settings.reward_weight > 0:
            terms.policy, terms.rlsd_weight_sum = self.policy_sum(groups, context, rows, loss_mask[rows])
        return terms

    def policy_sum(
        self, groups: GroupedRollouts, context: TeacherContext | None, rows: slice, mask: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """The clipped surrogate summed over the `mask` tokens of these rows, as GRPO computes it (with RLSD's
        token advantages in mode rlsd), and the sum of RLSD's token weights (0 in mode sum)."""
        logp, advantages = policy_log_probs(self.model, groups, rows, mask)
        weight_sum = 0.0
        if self.settings.mode == "rlsd":
            weights = self.rlsd_token_weights(groups, context, rows, mask, logp, advantages)
            advantages, weight_sum = advantages * weights, float(weights.sum())
        return clipped_policy_loss(logp, logp.detach(), advantages, self.clip).sum(), weight_sum

    def rlsd_token_weights(
        self,
        groups: GroupedRollouts,
        context: TeacherContext,
        rows: slice,
        mask: torch.Tensor,
        logp: torch.Tensor,
        advantages: torch.Tensor,
    ) -> torch.Tensor:
        """RLSD's weight of each `mask` token of these rows, from the teacher's log-prob of the token in its
        context (raw logits: the divergence's temperature is not involved) against the student's `logp`."""
        completion_ids = groups.rollout.completion_ids[rows]
        completion_mask = groups.rollout.completion_mask[rows]
        teacher_batch = build_scoring_batch(context.prompt.rows(rows), completion_ids, completion_mask)
        with torch.no_grad(), self.teacher.scoring(self.model) as teacher:
            teacher_logp = token_log_probs(completion_logits(teacher.model, teacher_batch), completion_ids)
        # A row without a teacher context (a skipped group) keeps its plain advantage.
        has_context = context.rows[rows][:, None].expand_as(mask)[mask]
        log_ratio = torch.where(has_context, teacher_logp[mask] - logp.detach(), 0.0)
        return rlsd_weights(advantages, log_ratio, self.settings.log_ratio_clip)

    # ---- the teacher's context ---------------------------------------------------------------
    def teacher_context(self, batch: Mapping, groups: GroupedRollouts, micro_index: int) -> TeacherContext:
        """The teacher prompt of every row (`[G*B, Lt]`) and which rows have one."""
        every_row = torch.ones(len(groups.rewards), dtype=torch.bool, device=self.device)
        if not self.teacher.privileged_context:  # a separate teacher model sees what the student sees
            return TeacherContext(groups.prompt, every_row)
        if self.settings.privileged_context == "own_rollout":
            return self.own_rollout_context(batch, groups)
        solutions = reference_solutions(batch, range(len(batch["problem"])))
        rationales = self.teacher_rationales(batch, micro_index) if self.reason_first else None
        prompt = self.contexts.teacher_batch(
            repeat_rows(batch["problem"], self.group_size),
            repeat_rows(solutions, self.group_size),
            repeat_rows(rationales, self.group_size) if rationales is not None else None,
        )
        return TeacherContext(prompt.to(self.device), every_row)

    def own_rollout_context(self, batch: Mapping, groups: GroupedRollouts) -> TeacherContext:
        """SSOPD: each group's teacher reads the group's shortest correct rollout, its ids spliced in."""
        solutions = [self.solution_ids(groups, row) for row in range(len(groups.rewards))]
        chosen = shortest_correct(groups.rewards, torch.tensor([len(s) for s in solutions]), self.group_size)
        missing = [group for group, row in enumerate(chosen) if row is None]
        fallback = "reference" if self.settings.no_correct_rollout == "reference" else None
        references = dict(zip(missing, reference_solutions(batch, missing), strict=True)) if fallback else {}
        prompts, has_context = [], []
        for group, row in enumerate(chosen):
            problem = batch["problem"][group]
            if row is not None:
                ids = self.contexts.teacher_ids_spliced(problem, solutions[row])
            elif group in references:
                ids = self.contexts.teacher_ids(problem, references[group])
            else:  # skipped: a placeholder prompt, its rows masked out of the distillation
                ids = self.contexts.student_ids(problem)
            prompts.extend([ids] * self.group_size)
            has_context.extend([row is not None or group in references] * self.group_size)
        return TeacherContext(
            left_pad(prompts, self.tokenizer.pad_token_id).to(self.device),
            torch.tensor(has_context, dtype=torch.bool, device=self.device),
            {"groups_without_correct": len(missing) / max(len(chosen), 1)},
        )

    def solution_ids(self, groups: GroupedRollouts, row: int) -> list[int]:
        """A rollout's own token ids, without its EOS and padding (the teacher context gets no EOS)."""
        rollout = groups.rollout
        ids = rollout.completion_ids[row][rollout.completion_mask[row]].tolist()
        return ids[:-1] if ids and not bool(rollout.truncated[row]) and ids[-1] in self.eos_ids else ids


def reference_solutions(batch: Mapping, groups: Sequence[int]) -> list[str]:
    """The dataset's reference solution of these problems; an error naming the option when one is missing."""
    solutions = batch.get("solution")
    found = [solutions[group] if solutions is not None else None for group in groups]
    if not all(isinstance(s, str) and s.strip() for s in found):
        raise ValueError(
            "a problem has no reference solution, which the teacher context needs here "
            "(algorithm.privileged_context=reference, or no_correct_rollout=reference for a group with no "
            "correct rollout); use algorithm.privileged_context=own_rollout with no_correct_rollout=skip"
        )
    return found
