"""Episodes: everything a training step has sampled, one row per episode.

An episode is a student prompt and the completion the policy sampled for it (or, for SFT, the reference
written as a completion), with the mask of the tokens the objective supervises. Rows of one problem form a
group (`group_size` consecutive rows, problem-major); graded rewards and group-normalised advantages ride
along when the sampler computed them. Objective terms read episodes and nothing else about the sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from opsd_lightning.contexts.batches import TokenBatch


@dataclass
class Episodes:
    """`R = group_size x len(problems)` episodes; every tensor is on the module's device.

    `prompt`: the student prompt of every row, left-padded `[R, Lp]`.
    `completion_ids` / `completion_mask`: the completion, right-padded, and its tokens (EOS included),
        `[R, Lc]`.
    `loss_mask`: the completion tokens the objective supervises (a subset of `completion_mask`: truncated rows
        may be left out; in a multi-turn episode, the environment's tokens will be).
    `truncated`: rows that hit the token budget without EOS `[R]`.
    `problems` / `solutions` / `answers`: the batch's rows (one per group); the last two may hold None.
    `rewards` / `advantages`: `[R]` float32 when graded (group samplers), else None.
    `sampler_logprobs`: log q of each completion token under the engine that sampled it `[R, Lc]` (the
        rollout's, see `Rollout`), else None.
    `generated`: tokens this rank generated for these episodes; `seconds`: this rank's generation time;
    `sampled`: False for episodes that were not generated (SFT's references).
    `stats`: what the sampler adds to the step's logs.
    """

    prompt: TokenBatch
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    loss_mask: torch.Tensor
    truncated: torch.Tensor
    problems: Sequence[str]
    solutions: Sequence[str | None]
    answers: Sequence[str | None]
    group_size: int = 1
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    sampler_logprobs: torch.Tensor | None = None
    generated: int = 0
    seconds: float = 0.0
    sampled: bool = True
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    def problem_of_row(self, row: int) -> int:
        return row // self.group_size

    def rows(self, rows: slice) -> Episodes:
        """These rows (the prompt without the padding columns no row in it needs); metadata stays whole."""
        return replace(
            self,
            prompt=self.prompt.rows(rows),
            completion_ids=self.completion_ids[rows],
            completion_mask=self.completion_mask[rows],
            loss_mask=self.loss_mask[rows],
            truncated=self.truncated[rows],
            rewards=None if self.rewards is None else self.rewards[rows],
            advantages=None if self.advantages is None else self.advantages[rows],
            sampler_logprobs=None if self.sampler_logprobs is None else self.sampler_logprobs[rows],
        )

    def rollout_stats(self) -> dict[str, float]:
        """What every sampled step logs about its episodes (means over rows), plus the sampler's own stats."""
        stats = {
            "completion_length": float(self.lengths.float().mean()),
            "truncation_rate": float(self.truncated.float().mean()),
        }
        if self.rewards is not None:
            stats = {"reward": float(self.rewards.float().mean()), **stats}
        if self.sampled:
            # All ranks generate at once: the global token count over this rank's generation time.
            stats["rollout_tokens_per_s"] = self.generated / max(self.seconds, 1e-9)
        return {**stats, **self.stats}


def repeat_rows(values: Sequence, times: int) -> list:
    """Each value `times` times in a row: `[a, b] -> [a, a, b, b]`."""
    return [value for value in values for _ in range(times)]
