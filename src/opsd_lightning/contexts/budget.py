"""The prompt budget: the longest prompt allowed, and what happens to a training row whose prompt is longer.

Every length here is measured through the renderer's own rendering path with its own thinking flags, so a row
is kept or cut on the length it will have when rendered for training. The renderer (`contexts/renderer.py`)
holds a budget, so this module knows it only by the `PromptRenderer` protocol: imports point one way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OVERLONG_POLICIES = ("truncate_solution", "drop", "raise")


@dataclass(frozen=True)
class PromptBudget:
    """`context.max_prompt_tokens` and `context.overlong`, checked on construction.

    Args:
        max_prompt_tokens: the longest prompt (student or teacher) in tokens; None for no limit.
        overlong: what `fit_rows` does with a training row whose prompt is longer: `truncate_solution` cuts
            the reference solution's end until the teacher prompt fits (a student prompt over the limit
            cannot be cut: that row is dropped), `drop` drops the row, `raise` stops with an error. A prompt
            that reaches rendering still too long always raises.
    """

    max_prompt_tokens: int | None = None
    overlong: str = "truncate_solution"

    def __post_init__(self) -> None:
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"context.overlong={self.overlong!r}: use one of {list(OVERLONG_POLICIES)}")
        limit = self.max_prompt_tokens
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"context.max_prompt_tokens={limit!r} must be an integer >= 1 (or null)")

    def fits(self, length: int) -> bool:
        return self.max_prompt_tokens is None or length <= self.max_prompt_tokens

    def check_rendered(self, length: int) -> None:
        """Raise for a rendered prompt over the limit (training rows were fitted before; this one was not)."""
        if not self.fits(length):
            raise ValueError(
                f"a rendered prompt has {length} tokens, over context.max_prompt_tokens="
                f"{self.max_prompt_tokens} (training rows are fitted by context.overlong; this prompt came "
                "from elsewhere, e.g. a benchmark or a datamodule without connect(renderer))"
            )


class PromptRenderer(Protocol):
    """What `fit_rows` needs of a renderer (`contexts.ContextRenderer` is one): its budget, its tokenizer, and
    the prompts' ids as rendered, with and without the limit."""

    budget: PromptBudget
    tokenizer: PreTrainedTokenizerBase

    def without_limit(self) -> PromptRenderer: ...

    def student_ids(self, problem: str) -> list[int]: ...

    def teacher_ids(self, problem: str, solution: str) -> list[int]: ...


def fit_rows(
    renderer: PromptRenderer, rows: Sequence[dict[str, str]]
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Apply `renderer.budget` to training rows: the rows to train on and the counts
    `{"dropped": ..., "truncated": ...}` (rows are never modified in place)."""
    counts = {"dropped": 0, "truncated": 0}
    if renderer.budget.max_prompt_tokens is None:
        return list(rows), counts
    budget, measure = renderer.budget, renderer.without_limit()
    kept = []
    for index, row in enumerate(rows):
        outcome, fitted = _fit_row(budget, measure, index, row)
        if fitted is not None:
            kept.append(fitted)
        if outcome != "kept":
            counts[outcome] += 1
    return kept, counts


def _fit_row(
    budget: PromptBudget, measure: PromptRenderer, index: int, row: dict[str, str]
) -> tuple[str, dict[str, str] | None]:
    """`("kept", row)`, `("truncated", row with a shorter solution)` or `("dropped", None)`; `measure` is
    the renderer without its limit, so a prompt over it is measured instead of raising."""
    student = len(measure.student_ids(row["problem"]))
    teacher = len(measure.teacher_ids(row["problem"], row["solution"]))
    if budget.fits(max(student, teacher)):
        return "kept", row
    if budget.overlong == "raise":
        raise ValueError(
            f"training row {index} has a {student}-token student prompt and a {teacher}-token "
            f"teacher prompt, over context.max_prompt_tokens={budget.max_prompt_tokens}; set "
            "context.overlong=truncate_solution or drop, or raise the limit"
        )
    if budget.overlong == "drop" or not budget.fits(student):
        return "dropped", None
    solution = _truncated_solution(measure, budget.max_prompt_tokens, row)
    return ("dropped", None) if solution is None else ("truncated", {**row, "solution": solution})


def _truncated_solution(measure: PromptRenderer, limit: int, row: dict[str, str]) -> str | None:
    """The longest prefix (in tokens) of the solution whose teacher prompt fits; None if none does."""
    tokenizer = measure.tokenizer
    tokens = tokenizer.encode(row["solution"], add_special_tokens=False)
    while tokens:
        excess = len(measure.teacher_ids(row["problem"], tokenizer.decode(tokens))) - limit
        if excess <= 0:
            return tokenizer.decode(tokens)
        tokens = tokens[:-excess]  # re-tokenising at the cut can shift a token or two: check again
    return None
