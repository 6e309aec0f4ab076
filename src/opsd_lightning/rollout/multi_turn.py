"""Multi-turn episodes with tools: the model writes until it closes a tool call or ends its answer; the
environment runs the call and its response is appended as the chat template renders it; the model goes on,
up to `environment.max_turns` turns and `max_tokens` tokens.

A completion is every token after the student prompt: the model's turns and the environment's responses,
appended as ids (the model's tokens are never decoded and re-encoded). Its `loss_mask` holds the model's
tokens only: tool responses and the template's scaffolding around them are never supervised. All of a step's
live episodes are generated together, one engine call per turn, through the engine interface (hf or vllm).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedTokenizerBase

from opsd_lightning.contexts.batches import left_pad
from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.environments.base import Environment
from opsd_lightning.environments.format import ToolFormat
from opsd_lightning.environments.tools import ToolCall
from opsd_lightning.objectives.policy_gradient import group_advantages
from opsd_lightning.rollout.episodes import Episodes, repeat_rows
from opsd_lightning.rollout.samplers import RolloutSource, Sampler


@dataclass
class EpisodeTrace:
    """One episode as it is sampled: its completion ids, which are the model's, and its tool calls."""

    ids: list[int] = field(default_factory=list)
    model: list[bool] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    turns: int = 0
    done: bool = False
    truncated: bool = False
    # Each model turn's ids; every turn but the last closed the call `calls[turn]` (the last may have too).
    turn_ids: list[list[int]] = field(default_factory=list)

    def extend(self, ids: list[int], by_model: bool) -> None:
        self.ids += ids
        self.model += [by_model] * len(ids)

    def text(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """The model's own tokens decoded (no tool responses): what the reward and the grader read."""
        return tokenizer.decode(
            [i for i, m in zip(self.ids, self.model, strict=True) if m], skip_special_tokens=True
        )


@dataclass
class EpisodeRun:
    """A batch of episodes as sampled: one trace per prompt, and the tokens and seconds generation took."""

    traces: list[EpisodeTrace]
    generated: int
    seconds: float


def environment_contexts(environment: Environment, contexts: ContextRenderer) -> ContextRenderer:
    """The renderer with the environment's tools in every prompt; refuses a chat template that cannot render
    tool calls (before any training or evaluation)."""
    schemas = environment.toolbox.schemas()
    if not schemas:
        return contexts
    ToolFormat(contexts.tokenizer, schemas, contexts.student_enable_thinking)
    return contexts.with_tools(schemas)


def run_episodes(
    environment: Environment, prompt_ids: Sequence[list[int]], source: RolloutSource, seed: int | None
) -> EpisodeRun:
    """One episode per prompt in `environment`, all live ones generated together, one engine call per turn
    (training's multi-turn sampler and benchmark evaluation alike)."""
    env, tokenizer = environment, source.tokenizer
    schemas = env.toolbox.schemas()
    fmt = ToolFormat(tokenizer, schemas, source.contexts.student_enable_thinking) if schemas else None
    budget = env.max_tokens or source.sampling.max_new_tokens
    stop_ids = [*source.eos_ids, *([fmt.close_id] if fmt else [])]
    traces = [EpisodeTrace() for _ in prompt_ids]
    generated, seconds = 0, 0.0
    for turn in range(env.max_turns):
        live = [row for row, trace in enumerate(traces) if not trace.done]
        if not live:
            break
        room = {row: budget - len(traces[row].ids) for row in live}
        sampling = replace(source.sampling, max_new_tokens=max(room.values()))
        prompt = left_pad([list(prompt_ids[r]) + traces[r].ids for r in live], tokenizer.pad_token_id)
        turn_seed = None if seed is None else seed + 7919 * turn
        rollout = source.generate_with(prompt.to(source.device), sampling, stop_ids, turn_seed)
        generated += source.count(rollout)
        seconds += rollout.seconds
        for index, row in enumerate(live):
            trace = traces[row]
            ids = rollout.completion_ids[index][rollout.completion_mask[index]].tolist()[: room[row]]
            trace.extend(ids, by_model=True)
            trace.turn_ids.append(ids)
            trace.turns = turn + 1
            _finish_turn(env, trace, ids, fmt, source.eos_ids, budget, last_turn=turn + 1 == env.max_turns)
    return EpisodeRun(traces, generated, seconds)


def _finish_turn(
    environment: Environment,
    trace: EpisodeTrace,
    ids: list[int],
    fmt: ToolFormat | None,
    eos_ids: Sequence[int],
    budget: int,
    last_turn: bool,
) -> None:
    if ids and ids[-1] in eos_ids:
        trace.done = True  # the final answer
        return
    call = fmt.call_text(ids) if fmt is not None else None
    if call is None or last_turn:
        # The budget ran out mid-turn, or the turn limit came with a call still open: not finished.
        trace.done = trace.truncated = True
        return
    result = environment.toolbox.call(call)
    trace.calls.append(result)
    response = fmt.response_ids(result.response)
    if len(trace.ids) + len(response) >= budget:
        trace.done = trace.truncated = True
        return
    trace.extend(response, by_model=False)


class MultiTurnSampler(Sampler):
    """Episodes in an environment, one per problem (`group_size=1`) or groups with graded advantages.

    Args:
        environment: the task (`environments/base.py`): tools, turn and token limits, reward.
        group_size: episodes per problem; >= 2 computes group-normalised advantages (GRPO, the hybrid).
        mask_truncated: leave truncated episodes out of the loss, as `SingleSampler`'s.
    """

    def __init__(self, environment: Environment, group_size: int = 1, mask_truncated: bool = False) -> None:
        if group_size < 1:
            raise ValueError(f"algorithm.group_size={group_size} must be >= 1")
        self.environment = environment
        self.group_size = group_size
        self.mask_truncated = mask_truncated
        self.traces: list[EpisodeTrace] = []  # the last step's episodes, for records and tests

    def contexts_for(self, contexts: ContextRenderer) -> ContextRenderer:
        return environment_contexts(self.environment, contexts)

    def sample(self, batch: Mapping, source: RolloutSource, seed: int) -> Episodes:
        problems = repeat_rows(batch["problem"], self.group_size)
        prompt_ids = [source.contexts.student_ids(p) for p in problems]
        run = run_episodes(self.environment, prompt_ids, source, seed)
        self.traces = run.traces
        return self._episodes(batch, problems, prompt_ids, run.traces, source, run.generated, run.seconds)

    def _episodes(
        self, batch, problems, prompt_ids, traces, source: RolloutSource, generated: int, seconds: float
    ) -> Episodes:
        pad = source.tokenizer.pad_token_id
        width = max([len(t.ids) for t in traces] + [1])
        ids = torch.full((len(traces), width), pad, dtype=torch.long)
        completion_mask = torch.zeros((len(traces), width), dtype=torch.bool)
        loss_mask = torch.zeros_like(completion_mask)
        for row, trace in enumerate(traces):
            ids[row, : len(trace.ids)] = torch.tensor(trace.ids, dtype=torch.long)
            completion_mask[row, : len(trace.ids)] = True
            loss_mask[row, : len(trace.ids)] = torch.tensor(trace.model, dtype=torch.bool)
        truncated = torch.tensor([t.truncated for t in traces])
        if self.mask_truncated:
            loss_mask &= ~truncated[:, None]
        device = source.device
        prompt = left_pad(prompt_ids, pad).to(device)
        originals = list(batch["problem"])
        episodes = Episodes(
            prompt=prompt,
            completion_ids=ids.to(device),
            completion_mask=completion_mask.to(device),
            loss_mask=loss_mask.to(device),
            truncated=truncated.to(device),
            problems=originals,
            solutions=[
                self.environment.privileged_context(problem, solution)
                for problem, solution in zip(
                    originals, batch.get("solution") or [None] * len(originals), strict=True
                )
            ],
            answers=list(batch.get("answer") or [None] * len(originals)),
            group_size=self.group_size,
            generated=generated,
            seconds=seconds,
        )
        answers = repeat_rows(episodes.answers, self.group_size)
        texts = [trace.text(source.tokenizer) for trace in traces]
        rewards = torch.tensor([self.environment.reward(x, a) for x, a in zip(texts, answers, strict=True)])
        if self.group_size > 1:
            episodes.rewards = rewards.float().to(device)
            episodes.advantages = group_advantages(rewards.float(), self.group_size).to(device)
        episodes.stats = {
            "tool_calls": sum(len(t.calls) for t in traces) / len(traces),
            "tool_errors": sum(c.error for t in traces for c in t.calls) / len(traces),
            "turns": sum(t.turns for t in traces) / len(traces),
        }
        return episodes


def environment_sampler(environment: Environment, sampler: Sampler | None) -> MultiTurnSampler:
    """The multi-turn sampler that replaces a recipe's sampler when the run has an environment: as many
    episodes per problem as the recipe's sampler draws, truncated ones masked as it masks them."""
    if sampler is not None and not sampler.generates:
        raise ValueError(
            f"environment={type(environment).__name__}: {type(sampler).__name__} generates nothing (SFT), so "
            "there are no episodes to run in an environment; use an on-policy algorithm (opsd, grpo, hybrid)"
        )
    group_size = sampler.group_size if sampler is not None else 1
    return MultiTurnSampler(environment, group_size, bool(getattr(sampler, "mask_truncated", False)))
