"""GRPO baseline: G rollouts per problem, binary reward from the grader, group-normalised advantages,
clipped policy-gradient objective, optional KL to the initial policy."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from opsd_lightning.algorithms.base import MicroBatchLoss, PolicyModule
from opsd_lightning.algorithms.settings import GroupSettings
from opsd_lightning.batches import build_scoring_batch
from opsd_lightning.evaluation.grading import extract_answer, grade
from opsd_lightning.losses.policy_gradient import clipped_policy_loss, group_advantages, k3_kl
from opsd_lightning.scoring import completion_logits
from opsd_lightning.teachers import FixedTeacher


class GRPOModule(PolicyModule):
    """GRPO LightningModule (one policy update per rollout batch, so the ratio starts at 1).

    Args (beyond `PolicyModule`'s):
        group_size: rollouts per problem (G); advantages are normalised within each group.
        clip: ε of the clipped ratio.
        kl_coef: weight of the per-token KL(π‖π_0) to the initial weights (0 = off, no reference kept).
    """

    flat_settings = (*PolicyModule.flat_settings, GroupSettings)

    def __init__(self, *args, group_size: int = 4, clip: float = 0.2, kl_coef: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        settings = GroupSettings(group_size, clip, kl_coef)
        self.group_size, self.clip, self.kl_coef = settings.group_size, settings.clip, settings.kl_coef
        self.reference = FixedTeacher() if kl_coef > 0 else None
        if self.reference is not None:
            self.reference.attach(self.model)

    def micro_batch_loss(self, batch: Mapping, micro_index: int) -> MicroBatchLoss:
        if not batch.get("answer") or not all(batch["answer"]):
            raise ValueError(
                "algorithm=grpo needs an `answer` for every problem (the reward is graded against it)"
            )
        problems = [p for p in batch["problem"] for _ in range(self.group_size)]
        answers = [a for a in batch["answer"] for _ in range(self.group_size)]
        prompt = self.contexts.student_batch(problems).to(self.device)
        rollout = self.rollout(prompt, self.sampling, seed=self.rollout_seed(micro_index))
        generated = self.count_generated(rollout)
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        rewards = torch.tensor(
            [float(grade(extract_answer(t), a)) for t, a in zip(texts, answers, strict=True)]
        )
        advantages = group_advantages(rewards, self.group_size).to(self.device)

        scoring = build_scoring_batch(prompt, rollout.completion_ids, rollout.completion_mask)
        mask = rollout.completion_mask
        logp = _token_log_probs(completion_logits(self.model, scoring), rollout.completion_ids)[mask]
        token_advantages = advantages[:, None].expand_as(mask)[mask]
        per_token = clipped_policy_loss(logp, logp.detach(), token_advantages, self.clip)
        if self.reference is not None:
            with self.reference.scoring(self.model) as reference:
                reference_logits = completion_logits(reference.model, scoring)
            logp_ref = _token_log_probs(reference_logits, rollout.completion_ids)[mask]
            per_token = per_token + self.kl_coef * k3_kl(logp, logp_ref)
        stats = {
            "reward": float(rewards.mean()),
            "completion_length": float(rollout.lengths.float().mean()),
            "truncation_rate": float(rollout.truncated.float().mean()),
            "rollout_tokens_per_s": generated / max(rollout.seconds, 1e-9),
        }
        return MicroBatchLoss(loss_sum=per_token.sum(), num_tokens=mask.sum(), stats=stats)


def _token_log_probs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log π(token) at every completion position, fp32, `[B, Lc]`."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
