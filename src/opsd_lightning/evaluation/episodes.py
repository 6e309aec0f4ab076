"""Benchmark evaluation in an environment (`environment:` in the config, e.g. data=arith_tools): each of a
problem's samples is a multi-turn episode run by the training sampler's own loop (`rollout/multi_turn.py`),
graded on the model's final answer, and recorded turn by turn for the per-problem JSONL.

An episode's record: `turns`, one per model turn in order, each `{"text": the turn's tokens decoded as
written (special tokens kept), "tool_call": {"call", "name", "response", "error"} or null}` (the call the turn
closed and what the environment answered; null for the final answer, or a call left unrun at a limit), and
`model_tokens`, the model's own tokens (the sample's `length` counts the tool responses too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.environments.base import Environment
from opsd_lightning.rollout import RolloutEngine, SamplingConfig
from opsd_lightning.rollout.multi_turn import EpisodeTrace, run_episodes
from opsd_lightning.rollout.samplers import RolloutSource


def episode_record(trace: EpisodeTrace, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What the JSONL keeps of one episode (see the module docstring)."""
    turns = []
    for index, ids in enumerate(trace.turn_ids):
        # A turn that closed a call which ran is followed by its response: calls pair with turns in order.
        call = trace.calls[index] if index < len(trace.calls) else None
        turns.append(
            {
                "text": tokenizer.decode(ids, skip_special_tokens=False),
                "tool_call": None
                if call is None
                else {"call": call.text, "name": call.name, "response": call.response, "error": call.error},
            }
        )
    return {"turns": turns, "model_tokens": sum(trace.model)}


def sample_episodes(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    contexts: ContextRenderer,
    problems: Sequence[str],
    solutions: Sequence[str] | None,
    sampling: SamplingConfig,
    eos_ids: Sequence[int],
    seed: int | None,
    engine: RolloutEngine,
    environment: Environment,
) -> tuple[list[str], list[int], list[bool], list[dict[str, Any]]]:
    """One episode per problem row (from the student prompt, or the teacher's with the environment's
    privileged context when `solutions` are given): the model's texts, completion lengths (model and tool
    tokens), truncation flags and episode records."""
    if solutions is None:
        prompt_ids = [contexts.student_ids(problem) for problem in problems]
    else:
        prompt_ids = [
            contexts.teacher_ids(problem, environment.privileged_context(problem, solution))
            for problem, solution in zip(problems, solutions, strict=True)
        ]
    pad_id = tokenizer.pad_token_id

    def generate_with(prompt, settings: SamplingConfig, stop_ids: Sequence[int], turn_seed: int | None):
        return engine.generate(model, prompt, settings, stop_ids, pad_id, turn_seed)

    source = RolloutSource(
        contexts,
        tokenizer,
        eos_ids,
        next(model.parameters()).device,
        generate=lambda prompt, turn_seed: generate_with(prompt, sampling, eos_ids, turn_seed),
        count=lambda rollout: int(rollout.completion_mask.sum()),  # this rank's: nothing logs it here
        sampling=sampling,
        generate_with=generate_with,
    )
    traces = run_episodes(environment, prompt_ids, source, seed).traces
    return (
        [trace.text(tokenizer) for trace in traces],
        [len(trace.ids) for trace in traces],
        [trace.truncated for trace in traces],
        [episode_record(trace, tokenizer) for trace in traces],
    )
