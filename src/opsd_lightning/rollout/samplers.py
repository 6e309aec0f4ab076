"""Samplers: how a batch of problems becomes episodes. A sampler drives the rollout engine and nothing else.

- `SingleSampler`: one rollout per problem (OPSD).
- `GroupSampler`: `group_size` rollouts per problem, each graded against the problem's answer, with
  group-normalised advantages (GRPO, the hybrid, SSOPD).
- `ReferenceSampler`: the reference solutions written as completions, nothing generated (SFT).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from opsd_lightning.contexts.batches import TokenBatch
from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.evaluation.grading import extract_answer, grade
from opsd_lightning.objectives.policy_gradient import group_advantages
from opsd_lightning.options import at_least
from opsd_lightning.rollout import Rollout, SamplingConfig, completion_mask_from_ids
from opsd_lightning.rollout.episodes import Episodes, repeat_rows


@dataclass
class RolloutSource:
    """What a sampler may use: the renderer, the tokenizer, `generate(prompt, seed)`, which samples from the
    policy through the run's engine with the training `sampling`, and `count(rollout)`, which adds a rollout's
    tokens to the run's total (returns this rank's count; the optimizer step sums it over ranks). `sampling`
    and `generate_with(prompt, sampling, stop_ids, seed)` let a multi-turn sampler change the token budget
    and the stop ids of a turn."""

    contexts: ContextRenderer
    tokenizer: PreTrainedTokenizerBase
    eos_ids: Sequence[int]
    device: torch.device
    generate: Callable[[TokenBatch, int | None], Rollout]
    count: Callable[[Rollout], int]
    sampling: SamplingConfig | None = None
    generate_with: Callable[[TokenBatch, SamplingConfig, Sequence[int], int | None], Rollout] | None = None


class Sampler:
    """Turns a raw batch `{problem, solution, answer}` into `Episodes`."""

    # How many episodes each problem gets (rows are problem-major).
    group_size: int = 1
    # Whether it generates: a sampler that does not needs no `algorithm.sampling`.
    generates: bool = True

    def sample(self, batch: Mapping, source: RolloutSource, seed: int) -> Episodes:
        raise NotImplementedError

    def contexts_for(self, contexts: ContextRenderer) -> ContextRenderer:
        """The renderer of the run's student and teacher prompts (a multi-turn sampler adds its tools)."""
        return contexts


def _episodes(
    batch: Mapping,
    prompt: TokenBatch,
    rollout: Rollout,
    generated: int,
    group_size: int,
    mask_truncated: bool,
) -> Episodes:
    loss_mask = rollout.completion_mask
    if mask_truncated:
        loss_mask = loss_mask & ~rollout.truncated[:, None]
    problems = list(batch["problem"])
    return Episodes(
        prompt=prompt,
        completion_ids=rollout.completion_ids,
        completion_mask=rollout.completion_mask,
        loss_mask=loss_mask,
        truncated=rollout.truncated,
        problems=problems,
        solutions=list(batch.get("solution") or [None] * len(problems)),
        answers=list(batch.get("answer") or [None] * len(problems)),
        group_size=group_size,
        sampler_logprobs=rollout.sampler_logprobs,
        generated=generated,
        seconds=rollout.seconds,
    )


class SingleSampler(Sampler):
    """One rollout per problem from the student context.

    Args:
        mask_truncated: leave rollouts that hit `max_new_tokens` without EOS out of the loss (they are always
            counted, and logged as `train/truncation_rate`).
    """

    def __init__(self, mask_truncated: bool = False) -> None:
        self.mask_truncated = mask_truncated

    def sample(self, batch: Mapping, source: RolloutSource, seed: int) -> Episodes:
        prompt = source.contexts.student_batch(batch["problem"]).to(source.device)
        rollout = source.generate(prompt, seed)
        return _episodes(batch, prompt, rollout, source.count(rollout), 1, self.mask_truncated)


class GroupSampler(Sampler):
    """`group_size` rollouts per problem, each rewarded 1 when its last `\\boxed{}` grades equal to the
    problem's answer, with advantages normalised within each group.

    Args:
        group_size: rollouts per problem (G >= 2).
        mask_truncated: as `SingleSampler`'s.
    """

    def __init__(self, group_size: int = 4, mask_truncated: bool = False) -> None:
        at_least("group_size", group_size, 2)
        self.group_size = group_size
        self.mask_truncated = mask_truncated

    def sample(self, batch: Mapping, source: RolloutSource, seed: int) -> Episodes:
        if not batch.get("answer") or not all(batch["answer"]):
            raise ValueError(
                "group sampling needs an `answer` for every problem (the reward is graded against it); "
                f"this batch has {'none' if not batch.get('answer') else 'an empty one'}"
            )
        prompt = source.contexts.student_batch(repeat_rows(batch["problem"], self.group_size))
        prompt = prompt.to(source.device)
        rollout = source.generate(prompt, seed)
        episodes = _episodes(
            batch, prompt, rollout, source.count(rollout), self.group_size, self.mask_truncated
        )
        texts = source.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        answers = repeat_rows(batch["answer"], self.group_size)
        rewards = torch.tensor(
            [float(grade(extract_answer(t), a)) for t, a in zip(texts, answers, strict=True)]
        )
        episodes.rewards = rewards.to(source.device)
        episodes.advantages = group_advantages(rewards, self.group_size).to(source.device)
        return episodes


class ReferenceSampler(Sampler):
    """SFT: the reference solution of each problem (text + EOS) as its completion; nothing is generated."""

    generates = False

    def sample(self, batch: Mapping, source: RolloutSource, seed: int) -> Episodes:
        prompt = source.contexts.student_batch(batch["problem"]).to(source.device)
        eos = source.eos_ids[0]
        encoded = [source.tokenizer.encode(s, add_special_tokens=False) + [eos] for s in batch["solution"]]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), source.tokenizer.pad_token_id, dtype=torch.long)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens)
        mask, truncated = completion_mask_from_ids(ids, source.eos_ids)
        rollout = Rollout(ids.to(source.device), mask.to(source.device), truncated.to(source.device), 0.0)
        episodes = _episodes(batch, prompt, rollout, 0, 1, mask_truncated=False)
        episodes.sampled = False
        return episodes
