"""On-Policy Self-Distillation: one model, a student context and a teacher context.

training_step, per micro-batch (see `PolicyModule` for the step-level reduction):
    raw text -> student / teacher prompt ids (chat template, left-padded)
             -> rollout from the student prompt (eval mode, no grad, seeded)
             -> [teacher prompt | completion] scored by the teacher (no grad, no dropout)
             -> [student prompt | completion] scored by the student (grad)
             -> per-token divergence on every completion token (EOS included, pads masked)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from opsd_lightning.algorithms.base import MicroBatchLoss, PolicyModule, completion_logits
from opsd_lightning.contexts import build_scoring_batch
from opsd_lightning.losses import Divergence, masked_token_sum
from opsd_lightning.rollout import SamplingConfig, eval_mode, generate_rollouts
from opsd_lightning.teachers import DynamicTeacher, Teacher


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
    """

    def __init__(
        self,
        *args,
        divergence: Divergence,
        teacher: Teacher | None = None,
        mask_truncated: bool = False,
        reason_first: bool = False,
        rationale_sampling: SamplingConfig | Mapping | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.reason_first = reason_first
        if isinstance(rationale_sampling, Mapping):
            rationale_sampling = SamplingConfig(**rationale_sampling)
        self.rationale_sampling = rationale_sampling or SamplingConfig(temperature=0.0, max_new_tokens=64)
        self.divergence = divergence
        self.teacher = teacher if teacher is not None else DynamicTeacher()
        self.teacher.attach(self.model)
        self.mask_truncated = mask_truncated

    def micro_batch_loss(self, batch: Mapping, micro_index: int) -> MicroBatchLoss:
        student_prompt = self.contexts.student_batch(batch["problem"]).to(self.device)
        rollout = self.rollout(student_prompt, self.sampling, seed=self.rollout_seed(micro_index))
        generated = self.count_generated(rollout)
        rationales = self.teacher_rationales(batch, micro_index) if self.reason_first else None
        teacher_prompt = self.contexts.teacher_batch(batch["problem"], batch["solution"], rationales)
        teacher_prompt = teacher_prompt.to(self.device)
        loss_mask = rollout.completion_mask
        if self.mask_truncated:
            loss_mask = loss_mask & ~rollout.truncated[:, None]

        student_batch = build_scoring_batch(student_prompt, rollout.completion_ids, rollout.completion_mask)
        teacher_batch = build_scoring_batch(teacher_prompt, rollout.completion_ids, rollout.completion_mask)
        with (
            torch.no_grad(),
            self.teacher.scoring_model(self.model) as teacher_model,
            eval_mode(teacher_model),
        ):
            teacher_logits = completion_logits(teacher_model, teacher_batch)
        student_logits = completion_logits(self.model, student_batch)

        per_token = self.divergence.per_token(
            student_logits[loss_mask], teacher_logits[loss_mask], rollout.completion_ids[loss_mask]
        )
        loss_sum, num_tokens = masked_token_sum(per_token, torch.ones_like(per_token, dtype=torch.bool))
        stats = {
            "completion_length": float(rollout.lengths.float().mean()),
            "truncation_rate": float(rollout.truncated.float().mean()),
            "divergence": float(loss_sum.detach()) / max(int(num_tokens), 1),
            # All ranks generate at once: the global token count over this rank's rollout time.
            "rollout_tokens_per_s": generated / max(rollout.seconds, 1e-9),
        }
        return MicroBatchLoss(loss_sum=loss_sum, num_tokens=num_tokens, stats=stats)

    def teacher_rationales(self, batch: Mapping, micro_index: int) -> list[str]:
        """Reason-first: the teacher's explanation of each reference, as text for its next turn."""
        prompt = self.contexts.rationale_batch(batch["problem"], batch["solution"]).to(self.device)
        with self.teacher.scoring_model(self.model) as teacher_model:
            rollout = generate_rollouts(
                teacher_model,
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
