"""On-Policy Self-Distillation: one model, a student context and a teacher context.

training_step, per batch (see `PolicyModule` for the step-level reduction):
    raw text -> student / teacher prompt ids (chat template, left-padded)
             -> rollout from the student prompt for the whole batch (eval mode, no grad, seeded)
    then per `micro_batch_size` rows:
             -> [teacher prompt | completion] -> teacher hidden states (no grad, no dropout)
             -> [student prompt | completion] -> student hidden states (grad)
             -> per-token divergence on every completion token (EOS included, pads masked), with
                logits computed a chunk of positions at a time from the hidden states and the LM head,
                times the token weights (`weighting`), plus diagnostics of both distributions (no grad)
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from lightning.pytorch.strategies import ParallelStrategy

from opsd_lightning.algorithms.base import MicroBatchLoss, PolicyModule
from opsd_lightning.algorithms.settings import MicroBatchSettings
from opsd_lightning.batches import TokenBatch, build_scoring_batch
from opsd_lightning.losses import Divergence, TokenDiagnostics, TokenFeatures, TokenWeighting
from opsd_lightning.losses.chunked import LossSettings, chunked_objective_sum
from opsd_lightning.losses.objective import objective_sum
from opsd_lightning.options import build_settings
from opsd_lightning.rollout import SamplingConfig, generate_rollouts
from opsd_lightning.scoring import causal_lm_parts, completion_hidden, completion_logits, output_layer
from opsd_lightning.teachers import DynamicTeacher, Teacher

# Reason-first explanations when `rationale_sampling` is not given: greedy and short.
GREEDY_RATIONALE = {"temperature": 0.0, "max_new_tokens": 64}


@dataclass
class DivergenceSum:
    """`divergence_sum`'s result: the summed per-token objective of some rows (student grad only) and, when
    diagnostics are on, their per-token diagnostic sums (`TokenDiagnostics`: addable, `.means()` to log)."""

    loss_sum: torch.Tensor
    diagnostics: TokenDiagnostics | None = None


class OPSDModule(PolicyModule):
    """OPSD LightningModule.

    Args (beyond `PolicyModule`'s):
        divergence: per-token divergence D(p_T ‖ p_S) (`conf/divergence/`).
        teacher: which weights score the teacher context (`conf/teacher/`: dynamic, fixed, ema).
        mask_truncated: drop rollouts that hit `max_new_tokens` without EOS from the loss
            (they are always counted and logged as `train/truncation_rate`).
        reason_first: the teacher first explains the reference (sampled with `rationale_sampling`,
            greedy by default, by the teacher's weights); the explanation stays in its context while it
            scores the student's tokens. Its tokens count as generated tokens.
        loss: how the divergence is computed (`LossSettings`): `backend` `chunked` (default; logits from
            hidden states a chunk of `chunk_size` positions at a time) or `full_logits`.
        micro_batch_size: rows per forward/backward; the whole batch is generated at once (None = all).
        weighting: per-token weights of the divergence and an optional added forward-KL term
            (`conf/weighting/`: none, position, entropy); None = none.
        diagnostics: log `train/diag/...` (entropies, top-1 agreement, teacher mass on the student's
            top-k, clip fraction, divergence by position quarter), computed without grad from the loss's
            logits.
    """

    flat_settings = (*PolicyModule.flat_settings, MicroBatchSettings)
    nested_settings = {
        **PolicyModule.nested_settings,
        "rationale_sampling": SamplingConfig,
        "loss": LossSettings,
    }

    def __init__(
        self,
        *args,
        divergence: Divergence,
        teacher: Teacher | None = None,
        mask_truncated: bool = False,
        reason_first: bool = False,
        rationale_sampling: SamplingConfig | Mapping | None = None,
        loss: LossSettings | Mapping | None = None,
        micro_batch_size: int | None = None,
        weighting: TokenWeighting | None = None,
        diagnostics: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss = build_settings(LossSettings, loss, "algorithm.loss")
        self.micro_batch_size = MicroBatchSettings(micro_batch_size).micro_batch_size
        self.reason_first = reason_first
        self.rationale_sampling = build_settings(
            SamplingConfig, rationale_sampling or GREEDY_RATIONALE, "algorithm.rationale_sampling"
        )
        head = output_layer(self.model)
        if head is not None:
            divergence.check_vocabulary(head.weight.shape[0])
        self.divergence = divergence
        self.teacher = teacher if teacher is not None else DynamicTeacher()
        self.teacher.attach(self.model)
        self.mask_truncated = mask_truncated
        self.weighting = weighting
        self.diagnostics = diagnostics

    def micro_batch_loss(self, batch: Mapping, micro_index: int) -> MicroBatchLoss:
        # One generation for the whole batch; scoring and backward then go `micro_batch_size` rows at a
        # time, so the generation batch can be large while training memory stays bounded.
        student_prompt = self.contexts.student_batch(batch["problem"]).to(self.device)
        rollout = self.rollout(student_prompt, self.sampling, seed=self.rollout_seed(micro_index))
        generated = self.count_generated(rollout)
        rationales = self.teacher_rationales(batch, micro_index) if self.reason_first else None
        if self.teacher.privileged_context:
            require_references(batch, type(self).__name__)
            teacher_prompt = self.contexts.teacher_batch(batch["problem"], batch["solution"], rationales)
            teacher_prompt = teacher_prompt.to(self.device)
        else:  # classic distillation: a separate teacher model sees what the student sees
            teacher_prompt = student_prompt
        loss_mask = rollout.completion_mask
        if self.mask_truncated:
            loss_mask = loss_mask & ~rollout.truncated[:, None]

        slices = self.row_slices(len(batch["problem"]))
        loss_sum, num_tokens = torch.zeros((), device=self.device), torch.zeros((), dtype=torch.long)
        diagnostics: TokenDiagnostics | None = None
        for rows in slices:
            result = self.divergence_sum(
                student_prompt.rows(rows),
                teacher_prompt.rows(rows),
                rollout.completion_ids[rows],
                rollout.completion_mask[rows],
                loss_mask[rows],
            )
            part = result.loss_sum
            if result.diagnostics is not None:
                diagnostics = result.diagnostics if diagnostics is None else diagnostics + result.diagnostics
            if len(slices) > 1:
                with self.gradient_sync(rows is slices[-1]):
                    self.manual_backward(part)  # frees this slice's graph before the next one
                part = part.detach()
            loss_sum = loss_sum + part
            num_tokens = num_tokens + loss_mask[rows].sum().cpu()
        stats = {
            "completion_length": float(rollout.lengths.float().mean()),
            "truncation_rate": float(rollout.truncated.float().mean()),
            "divergence": float(loss_sum.detach()) / max(int(num_tokens), 1),
            # All ranks generate at once: the global token count over this rank's rollout time.
            "rollout_tokens_per_s": generated / max(rollout.seconds, 1e-9),
        }
        if diagnostics is not None:
            stats.update(diagnostics.means())
        return MicroBatchLoss(
            loss_sum=loss_sum, num_tokens=num_tokens, stats=stats, backward_done=len(slices) > 1
        )

    def gradient_sync(self, sync: bool) -> AbstractContextManager:
        """Around a backward: with `sync=False` under DDP its gradients only accumulate locally (`no_sync`),
        and the next synced backward all-reduces their sum. A no-op on one device or another strategy."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if sync or not isinstance(strategy, ParallelStrategy):
            return nullcontext()
        return strategy.block_backward_sync()

    def row_slices(self, num_rows: int) -> list[slice]:
        size = self.micro_batch_size or num_rows
        return [slice(start, min(start + size, num_rows)) for start in range(0, num_rows, size)]

    def divergence_sum(
        self,
        student_prompt: TokenBatch,
        teacher_prompt: TokenBatch,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> DivergenceSum:
        """The per-token objective summed over the `loss_mask` tokens of these rows (student grad only), and
        their diagnostic sums when `diagnostics` is on."""
        student_batch = build_scoring_batch(student_prompt, completion_ids, completion_mask)
        teacher_batch = build_scoring_batch(teacher_prompt, completion_ids, completion_mask)
        token_ids = completion_ids[loss_mask]
        features = completion_features(completion_mask, loss_mask)
        options = {"weighting": self.weighting, "features": features, "diagnostics": self.diagnostics}
        if self.loss.backend == "full_logits":
            with self.teacher.scoring(self.model) as teacher:
                teacher_logits = completion_logits(teacher.model, teacher_batch)[loss_mask]
            student_logits = completion_logits(self.model, student_batch)[loss_mask]
            result = objective_sum(student_logits, teacher_logits, token_ids, self.divergence, **options)
            return DivergenceSum(result.loss_sum, result.diagnostics)

        # Hidden states, and logits a chunk of positions at a time: never [tokens, vocab] at once.
        _, head = causal_lm_parts(self.model)
        with self.teacher.scoring(self.model) as teacher:
            teacher_hidden = completion_hidden(teacher.model, teacher_batch)[loss_mask]
        student_hidden = completion_hidden(self.model, student_batch)[loss_mask]
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
        return DivergenceSum(result.loss_sum, result.diagnostics)

    def teacher_rationales(self, batch: Mapping, micro_index: int) -> list[str]:
        """Reason-first: the teacher's explanation of each reference, as text for its next turn."""
        prompt = self.contexts.rationale_batch(batch["problem"], batch["solution"]).to(self.device)
        with self.teacher.scoring(self.model) as teacher:
            rollout = generate_rollouts(
                teacher.model,
                prompt,
                self.rationale_sampling,
                self.eos_ids,
                self.tokenizer.pad_token_id,
                self.rollout_seed(micro_index) + 1,
            )
        self.count_generated(rollout)
        return self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)

    def after_optimizer_step(self) -> None:
        self.teacher.after_optimizer_step(self.model)


def completion_features(completion_mask: torch.Tensor, loss_mask: torch.Tensor) -> TokenFeatures:
    """Each `loss_mask` token's 0-based position in its completion and its completion's length (EOS
    included), for the token weights and the diagnostics."""
    position = completion_mask.long().cumsum(dim=1) - 1
    length = completion_mask.long().sum(dim=1, keepdim=True).expand_as(position)
    return TokenFeatures(position=position[loss_mask], length=length[loss_mask])


def require_references(batch: Mapping, algorithm: str) -> None:
    """The teacher context holds the reference: a row without one (columns.solution=null) cannot be taught."""
    if not all(solution.strip() for solution in batch["solution"]):
        raise ValueError(
            f"{algorithm}'s teacher context holds the reference solution, and a training row has none "
            "(data.columns.solution=null or an empty solution). Without references use algorithm=ssopd "
            "(the teacher reads the group's shortest correct rollout) or a teacher with "
            "teacher.privileged_context=false."
        )
