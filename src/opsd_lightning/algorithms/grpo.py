"""GRPO baseline: G rollouts per problem, binary reward from the grader, group-normalised advantages,
clipped policy-gradient objective, optional KL to the initial policy."""

from __future__ import annotations

from collections.abc import Mapping

from opsd_lightning.algorithms.base import MicroBatchLoss, PolicyModule
from opsd_lightning.algorithms.groups import policy_log_probs, rollout_stats, sample_groups, token_log_probs
from opsd_lightning.algorithms.settings import GroupSettings
from opsd_lightning.batches import build_scoring_batch
from opsd_lightning.losses.policy_gradient import clipped_policy_loss, k3_kl
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
        groups = sample_groups(self, batch, self.group_size, micro_index, algorithm="grpo")
        rollout = groups.rollout
        mask = rollout.completion_mask
        logp, token_advantages = policy_log_probs(self.model, groups, slice(None), mask)
        per_token = clipped_policy_loss(logp, logp.detach(), token_advantages, self.clip)
        if self.reference is not None:
            scoring = build_scoring_batch(groups.prompt, rollout.completion_ids, mask)
            with self.reference.scoring(self.model) as reference:
                reference_logits = completion_logits(reference.model, scoring)
            logp_ref = token_log_probs(reference_logits, rollout.completion_ids)[mask]
            per_token = per_token + self.kl_coef * k3_kl(logp, logp_ref)
        return MicroBatchLoss(loss_sum=per_token.sum(), num_tokens=mask.sum(), stats=rollout_stats(groups))
