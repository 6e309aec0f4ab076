"""A new teacher context: OP²SD's, where the teacher reads a worked solution of ANOTHER training problem.

Problem i's teacher reads problem i and, as a worked example, the next problem of the batch (cyclically) with
that problem's reference solution. Its own reference never enters its context. The run's
`context.teacher_template` says "a reference solution to this problem ... reach the same final answer", which
would be false here, so this context renders its own template (the run's system prompt, thinking flag and
prompt budget still apply). From the repository root (see docs/extending.md):

    PYTHONPATH=experiments/extending opsd-train hydra.searchpath=[file://experiments/extending/conf] \
        teacher_context=other_problem
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from opsd_lightning.contexts.batches import left_pad
from opsd_lightning.contexts.renderer import fill_template
from opsd_lightning.contexts.teacher import ContextTools, TeacherContext, TeacherPrompts, reference_solutions
from opsd_lightning.rollout.episodes import Episodes

TEMPLATE = (
    "{problem}\n\nHere is a worked solution of a different problem:\n{solution}\n\n"
    "That problem is not this one, and its answer need not be this one's. Now solve the problem above "
    "yourself. Please reason step by step, and put your final answer within \\boxed{}."
)
EXAMPLE = "Problem: {problem}\nSolution: {solution}"


class OtherProblemContext(TeacherContext):
    """Problem i's teacher reads `template` with problem i in `{problem}` and, in `{solution}`, problem
    (i + shift) mod B with its reference (`example`), B the batch's problem count. Where that is problem i
    itself (a batch of one problem), its rows leave the terms that need a teacher (logged as
    `train/rows_without_other_problem`).

    Args:
        shift: which other problem (1 = the next one).
        template / example: the teacher's user message, and how the other problem fills its `{solution}`.
    """

    def __init__(self, shift: int = 1, template: str = TEMPLATE, example: str = EXAMPLE) -> None:
        if shift < 1:
            raise ValueError(f"teacher_context.shift={shift} must be >= 1 (0 would show the own reference)")
        self.shift, self.template, self.example = shift, template, example

    def build(self, batch: Mapping, episodes: Episodes, tools: ContextTools) -> TeacherPrompts:
        problems, size = episodes.problems, episodes.group_size
        solutions = reference_solutions(batch, range(len(problems)), "teacher_context=other_problem")
        renderer = tools.contexts.with_teacher_template(self.template)
        prompts, has_other = [], []
        for i, problem in enumerate(problems):
            other = (i + self.shift) % len(problems)
            if other == i:  # nothing else to show: a placeholder prompt, its rows masked out
                ids = renderer.student_ids(problem)
            else:
                example = fill_template(self.example, problem=problems[other], solution=solutions[other])
                ids = renderer.teacher_ids(problem, example)
            prompts.extend([ids] * size)
            has_other.extend([other != i] * size)
        rows = torch.tensor(has_other, dtype=torch.bool, device=tools.device)
        return TeacherPrompts(
            left_pad(prompts, tools.tokenizer.pad_token_id).to(tools.device),
            rows,
            {"rows_without_other_problem": 1.0 - float(rows.float().mean())},
        )
