"""Teacher contexts: what the teacher reads before it scores the student's tokens.

Each strategy builds one teacher prompt per episode row from the batch and the episodes (`TeacherPrompts`),
and says which rows have one (the others leave the terms that need a teacher):
- `ReferenceContext`: the dataset's reference solution (OPSD).
- `OwnRolloutContext`: the group's shortest correct rollout, its ids spliced in verbatim (SSOPD).
- `StudentContext`: the student's own prompt (classic on-policy distillation from a separate teacher).
- `ReasonFirstContext`: the reference, after an explanation of it that the teacher's weights generate.
A strategy of your own subclasses `TeacherContext` (docs/extending.md shows OP²SD's, a worked solution of
another problem of the batch: `experiments/extending/other_problem_context.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import PreTrainedTokenizerBase

from opsd_lightning._paths import config_dir
from opsd_lightning.contexts.batches import TokenBatch, left_pad
from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.options import build_settings
from opsd_lightning.rollout import HFEngine, Rollout, SamplingConfig
from opsd_lightning.rollout.episodes import Episodes, repeat_rows
from opsd_lightning.teachers.modes import Teacher

NO_CORRECT_ROLLOUT = ("skip", "reference")


@dataclass
class TeacherPrompts:
    """The teacher prompt of every episode row `[R, Lt]`, which rows have one (`[R]` bool), stats to log."""

    prompt: TokenBatch
    rows: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class ContextTools:
    """What a strategy may use besides the batch and the episodes: the renderer, the tokenizer, the model and
    the teacher (for a context the teacher writes), the device, a seed, and a counter for generated tokens."""

    contexts: ContextRenderer
    tokenizer: PreTrainedTokenizerBase
    model: nn.Module
    teacher: Teacher
    eos_ids: Sequence[int]
    device: torch.device
    seed: int
    count_generated: Callable[[Rollout], int] | None = None


class TeacherContext:
    """Builds the teacher prompts of a step's episodes."""

    # Whether it reads each group's graded rollouts (then the sampler must draw groups).
    needs_groups: bool = False

    def build(self, batch: Mapping, episodes: Episodes, tools: ContextTools) -> TeacherPrompts:
        raise NotImplementedError


def reference_solutions(batch: Mapping, problems: Sequence[int], why: str) -> list[str]:
    """The dataset's reference solution of these problems; an error naming the way out when one is missing."""
    solutions = batch.get("solution")
    found = [solutions[problem] if solutions is not None else None for problem in problems]
    if not all(isinstance(s, str) and s.strip() for s in found):
        raise ValueError(
            "a training problem has no reference solution (data.columns.solution=null or an empty one), "
            "which "
            f"{why} needs. Without references use algorithm=ssopd (the teacher reads the group's shortest "
            "correct rollout: teacher_context=own_rollout) or teacher=model with teacher_context=student."
        )
    return found


def _every_row(episodes: Episodes, device: torch.device) -> torch.Tensor:
    return torch.ones(len(episodes), dtype=torch.bool, device=device)


class ReferenceContext(TeacherContext):
    """The teacher reads the problem and its reference solution (`context.teacher_template`)."""

    def build(self, batch: Mapping, episodes: Episodes, tools: ContextTools) -> TeacherPrompts:
        # The episodes' solutions: the batch's, or what an environment gives the teacher (privileged_context).
        solutions = {"solution": episodes.solutions}
        solutions = reference_solutions(solutions, range(len(episodes.problems)), "teacher_context=reference")
        prompt = tools.contexts.teacher_batch(
            repeat_rows(episodes.problems, episodes.group_size), repeat_rows(solutions, episodes.group_size)
        )
        return TeacherPrompts(prompt.to(tools.device), _every_row(episodes, tools.device))


class StudentContext(TeacherContext):
    """The teacher reads what the student reads: classic on-policy distillation (with `teacher=model`)."""

    def build(self, batch: Mapping, episodes: Episodes, tools: ContextTools) -> TeacherPrompts:
        return TeacherPrompts(episodes.prompt, _every_row(episodes, tools.device))


@functools.cache
def _reason_first_defaults() -> dict[str, Any]:
    """The reason-first options as its config states them (their one home)."""
    config = OmegaConf.load(config_dir() / "teacher_context" / "reason_first.yaml")
    return OmegaConf.to_container(config, resolve=True)


class ReasonFirstContext(TeacherContext):
    """The teacher first explains the reference (sampled with `rationale_sampling` by the teacher's weights,
    through Hugging Face `generate`: an engine with its own copy of the weights holds the student's), and
    keeps that turn in its context while it scores. Its tokens count as generated tokens.

    Args:
        rationale_sampling: how the explanation is sampled; None: `conf/teacher_context/reason_first.yaml`'s.
    """

    def __init__(self, rationale_sampling: SamplingConfig | Mapping | None = None) -> None:
        self.rationale_sampling = build_settings(
            SamplingConfig,
            rationale_sampling or _reason_first_defaults()["rationale_sampling"],
            "teacher_context.rationale_sampling",
        )
        self.engine = HFEngine()

    def rationales(self, batch: Mapping, tools: ContextTools) -> list[str]:
        solutions = reference_solutions(batch, range(len(batch["problem"])), "teacher_context=reason_first")
        prompt = tools.contexts.rationale_batch(batch["problem"], solutions).to(tools.device)
        with tools.teacher.scoring(tools.model) as teacher:
            rollout = self.engine.generate(
                teacher.model,
                prompt,
                self.rationale_sampling,
                tools.eos_ids,
                tools.tokenizer.pad_token_id,
                tools.seed + 1,
            )
        if tools.count_generated is not None:
            tools.count_generated(rollout)
        return tools.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)

    def build(self, batch: Mapping, episodes: Episodes, tools: ContextTools) -> TeacherPrompts:
        rationales = self.rationales(batch, tools)
        size = episodes.group_size
        prompt = tools.contexts.teacher_batch(
            repeat_rows(episodes.problems, size),
            repeat_rows(list(batch["solution"]), size),
            repeat_rows(rationales, size),
        )
        return TeacherPrompts(prompt.to(tools.device), _every_row(episodes, tools.device))


def shortest_correct(rewards: torch.Tensor, lengths: torch.Tensor, group_size: int) -> list[int | None]:
    """Per group (consecutive runs of `group_size` rows), the row of its shortest rollout with reward 1
    (the first one on a tie), or None when no rollout of the group is correct."""
    chosen: list[int | None] = []
    for start in range(0, len(rewards), group_size):
        correct = [row for row in range(start, start + group_size) if rewards[row] > 0]
        chosen.append(min(correct, key=lambda row: (int(lengths[row]), row)) if correct else None)
    return chosen


class OwnRolloutContext(TeacherContext):
    """SSOPD: each group's teacher reads the group's shortest correct rollout, its token ids spliced into the
    teacher template verbatim (no EOS). Needs graded episodes (a group sampler).

    Args:
        no_correct_rollout: a group without a correct rollout leaves the terms that need a teacher (`skip`,
            logged as `train/groups_without_correct`) or is taught with its reference (`reference`).
    """

    needs_groups = True

    def __init__(self, no_correct_rollout: str = "skip") -> None:
        if no_correct_rollout not in NO_CORRECT_ROLLOUT:
            raise ValueError(
                f"teacher_context.no_correct_rollout={no_correct_rollout!r}: "
                f"use one of {list(NO_CORRECT_ROLLOUT)}"
            )
        self.no_correct_rollout = no_correct_rollout

    def build(self, batch: Mapping, episodes: Episodes, tools: ContextTools) -> TeacherPrompts:
        if episodes.rewards is None or episodes.group_size < 2:
            raise ValueError(
                "teacher_context=own_rollout reads the group's shortest correct rollout: it needs graded "
                "groups (algorithm=ssopd or algorithm=hybrid: group_size >= 2 rollouts per problem)"
            )
        solutions = [self.solution_ids(episodes, row, tools.eos_ids) for row in range(len(episodes))]
        lengths = torch.tensor([len(s) for s in solutions])
        chosen = shortest_correct(episodes.rewards, lengths, episodes.group_size)
        missing = [group for group, row in enumerate(chosen) if row is None]
        references = {}
        if self.no_correct_rollout == "reference":
            why = "teacher_context.no_correct_rollout=reference (for a group with no correct rollout)"
            references = dict(zip(missing, reference_solutions(batch, missing, why), strict=True))
        prompts, has_context = [], []
        for group, row in enumerate(chosen):
            problem = episodes.problems[group]
            if row is not None:
                ids = tools.contexts.teacher_ids_spliced(problem, solutions[row])
            elif group in references:
                ids = tools.contexts.teacher_ids(problem, references[group])
            else:  # skipped: a placeholder prompt, its rows masked out of the teacher's terms
                ids = tools.contexts.student_ids(problem)
            prompts.extend([ids] * episodes.group_size)
            has_context.extend([row is not None or group in references] * episodes.group_size)
        return TeacherPrompts(
            left_pad(prompts, tools.tokenizer.pad_token_id).to(tools.device),
            torch.tensor(has_context, dtype=torch.bool, device=tools.device),
            {"groups_without_correct": len(missing) / max(len(chosen), 1)},
        )

    @staticmethod
    def solution_ids(episodes: Episodes, row: int, eos_ids: Sequence[int]) -> list[int]:
        """A rollout's own token ids, without its EOS and padding (the teacher context gets no EOS)."""
        ids = episodes.completion_ids[row][episodes.completion_mask[row]].tolist()
        return ids[:-1] if ids and not bool(episodes.truncated[row]) and ids[-1] in eos_ids else ids
