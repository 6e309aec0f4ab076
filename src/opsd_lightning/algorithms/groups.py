"""Group sampling and grading, shared by GRPO and the hybrid: G rollouts per problem from the student
context, a binary reward per rollout (its last `\\boxed{}` graded against the problem's answer), and the
group-normalised advantages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from opsd_lightning.algorithms.base import PolicyModule
from opsd_lightning.batches import TokenBatch, build_scoring_batch
from opsd_lightning.evaluation.grading import extract_answer, grade
from opsd_lightning.losses.policy_gradient import group_advantages
from opsd_lightning.rollout import Rollout
from opsd_lightning.scoring import completion_logits


@dataclass
class GroupedRollouts:
    """A batch of B problems sampled G times each; rows are problem-major (the G rollouts of problem i
    are rows `i*G .. i*G+G-1`), as `group_advantages` expects.

    `prompt`: the student prompt of every row `[G*B, Lp]`; `rewards` / `advantages`: `[G*B]`, fp32, on the
    module's device; `generated`: this micro-batch's generated tokens over all ranks.
    """

    prompt: TokenBatch
    rollout: Rollout
    rewards: torch.Tensor
    advantages: torch.Tensor
    generated: int
    group_size: int

    @property
    def num_groups(self) -> int:
        return len(self.rewards) // self.group_size


def repeat_rows(values: Sequence, times: int) -> list:
    """Each value `times` times in a row: `[a, b] -> [a, a, b, b]`."""
    return [value for value in values for _ in range(times)]


def sample_groups(
    module: PolicyModule, batch: Mapping, group_size: int, micro_index: int, algorithm: str
) -> GroupedRollouts:
    """Sample `group_size` rollouts per problem (seeded by `module.rollout_seed`), count them, grade them."""
    if not batch.get("answer") or not all(batch["answer"]):
        raise ValueError(
            f"algorithm={algorithm} needs an `answer` for every problem (the reward is graded against it)"
        )
    prompt = module.contexts.student_batch(repeat_rows(batch["problem"], group_size)).to(module.device)
    rollout = module.rollout(prompt, module.sampling, seed=module.rollout_seed(micro_index))
    generated = module.count_generated(rollout)
    texts = module.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    answers = repeat_rows(batch["answer"], group_size)
    rewards = torch.tensor([float(grade(extract_answer(t), a)) for t, a in zip(texts, answers, strict=True)])
    advantages = group_advantages(rewards, group_size)
    return GroupedRollouts(
        prompt, rollout, rewards.to(module.device), advantages.to(module.device), generated, group_size
    )


def token_log_probs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log π(token) at every completion position, fp32, `[B, Lc]` (the whole `[B, Lc, V]` log-softmax)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def policy_log_probs(
    model: torch.nn.Module, groups: GroupedRollouts, rows: slice, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy term's inputs on these rows: log π of each `mask` token (with grad, from the model's full
    logits on the student context) and that token's group advantage, both `[tokens]`."""
    rollout = groups.rollout
    completion_ids = rollout.completion_ids[rows]
    scoring = build_scoring_batch(groups.prompt.rows(rows), completion_ids, rollout.completion_mask[rows])
    logp = token_log_probs(completion_logits(model, scoring), completion_ids)[mask]
    return logp, groups.advantages[rows][:, None].expand_as(mask)[mask]


def rollout_stats(groups: GroupedRollouts) -> dict[str, float]:
    """What every group-sampling algorithm logs about its rollouts."""
    rollout = groups.rollout
    return {
        "reward": float(groups.rewards.float().mean()),
        "completion_length": float(rollout.lengths.float().mean()),
        "truncation_rate": float(rollout.truncated.float().mean()),
        # All ranks generate at once: the global token count over this rank's rollout time.
        "rollout_tokens_per_s": groups.generated / max(rollout.seconds, 1e-9),
    }
