"""Student and teacher contexts, rendered by the tokenizer's own chat template straight to token ids.

The default prompts are stated once, in `conf/context/default.yaml`; the renderer reads them from there.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from opsd_lightning._paths import config_dir
from opsd_lightning.contexts.batches import TokenBatch, left_pad
from opsd_lightning.contexts.budget import PromptBudget

_PLACEHOLDER = re.compile(r"\{(problem|solution)\}")
# Stands for the solution while the chat template renders a teacher prompt as text around solution ids.
SOLUTION_SENTINEL = "\u27e6opsd-solution\u27e7"


def fill_template(template: str, **fields: str) -> str:
    """Replace `{problem}` / `{solution}` in one pass, leaving every other brace (LaTeX) alone."""
    return _PLACEHOLDER.sub(lambda match: fields[match.group(1)], template)


@functools.cache
def _load_default_context() -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(config_dir() / "context" / "default.yaml"), resolve=True)


def default_context_settings() -> dict[str, Any]:
    """`conf/context/default.yaml`, resolved: the default templates, flags and prompt budget."""
    return dict(_load_default_context())


class ContextRenderer:
    """Renders the student context `c_S(x)` and the teacher context `c_T(x, y*)` with the chat template.

    Every prompt goes through `render`, which raises for a prompt over `budget.max_prompt_tokens`.
    A template left as None is the one in `conf/context/default.yaml`.

    Args:
        student_template: user message for the student; `{problem}` is filled in.
        teacher_template: user message for the teacher; `{problem}` and `{solution}` are filled in.
        system_prompt: optional system message for both contexts.
        student_enable_thinking / teacher_enable_thinking: passed to the chat template independently.
        max_prompt_tokens / overlong: the prompt budget (see `PromptBudget`).
        rationale_template / rationale_followup: reason-first only; the user turn asking the teacher to
            explain the reference (`{problem}`, `{solution}`), and the turn after its explanation.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        student_template: str | None = None,
        teacher_template: str | None = None,
        system_prompt: str | None = None,
        student_enable_thinking: bool = False,
        teacher_enable_thinking: bool = False,
        max_prompt_tokens: int | None = None,
        overlong: str = "truncate_solution",
        rationale_template: str | None = None,
        rationale_followup: str | None = None,
    ) -> None:
        self.budget = PromptBudget(max_prompt_tokens, overlong)
        defaults = default_context_settings()
        self.student_template = _given_or_default(student_template, defaults, "student_template")
        self.teacher_template = _given_or_default(teacher_template, defaults, "teacher_template")
        self.rationale_template = _given_or_default(rationale_template, defaults, "rationale_template")
        self.rationale_followup = _given_or_default(rationale_followup, defaults, "rationale_followup")
        if "{problem}" not in self.student_template:
            raise ValueError("context.student_template must contain {problem}")
        if "{solution}" not in self.teacher_template:
            raise ValueError("context.teacher_template must contain {solution} (the privileged reference)")
        if tokenizer.chat_template is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; OPSD needs one")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.student_enable_thinking = student_enable_thinking
        self.teacher_enable_thinking = teacher_enable_thinking
        # Tool schemas every prompt renders with (`apply_chat_template(tools=...)`); None: no tools.
        self.tools: list[dict[str, Any]] | None = None

    def with_tools(self, tools: Sequence[dict[str, Any]]) -> ContextRenderer:
        """This renderer with `tools` rendered into every student and teacher prompt (an environment's)."""
        renderer = copy.copy(self)
        renderer.tools = list(tools) or None
        return renderer

    def template_options(self) -> dict[str, Any]:
        """What the chat template takes besides the messages: the tools, when there are any."""
        return {"tools": self.tools} if self.tools else {}

    def with_teacher_template(self, template: str) -> ContextRenderer:
        """This renderer with another teacher user message (a new teacher context's own wording); the system
        prompt, thinking flags and prompt budget stay the run's."""
        if "{solution}" not in template:
            raise ValueError(f"a teacher template must contain {{solution}}: {template[:80]!r}")
        renderer = copy.copy(self)
        renderer.teacher_template = template
        return renderer

    def without_limit(self) -> ContextRenderer:
        """This renderer with no token limit: how the budget measures a prompt that may be over it."""
        unlimited = copy.copy(self)
        unlimited.budget = PromptBudget(overlong=self.budget.overlong)
        return unlimited

    def student_messages(self, problem: str) -> list[dict[str, str]]:
        return self._messages(fill_template(self.student_template, problem=problem))

    def teacher_messages(
        self, problem: str, solution: str, rationale: str | None = None
    ) -> list[dict[str, str]]:
        if rationale is None:
            return self._messages(fill_template(self.teacher_template, problem=problem, solution=solution))
        return [
            *self.rationale_messages(problem, solution),
            {"role": "assistant", "content": rationale},
            {"role": "user", "content": self.rationale_followup},
        ]

    def rationale_messages(self, problem: str, solution: str) -> list[dict[str, str]]:
        return self._messages(fill_template(self.rationale_template, problem=problem, solution=solution))

    def student_ids(self, problem: str) -> list[int]:
        return self.render(self.student_messages(problem), self.student_enable_thinking)

    def teacher_ids(self, problem: str, solution: str, rationale: str | None = None) -> list[int]:
        return self.render(self.teacher_messages(problem, solution, rationale), self.teacher_enable_thinking)

    def teacher_ids_spliced(self, problem: str, solution_ids: Sequence[int]) -> list[int]:
        """The teacher prompt with `solution_ids` in place of `{solution}`, verbatim (never decoded and
        re-encoded: a rollout keeps its own tokens). Over the budget with `overlong=truncate_solution`, the
        solution's last ids are cut until the prompt fits; otherwise it raises as `render` does.

        For a text solution this equals `teacher_ids(problem, solution)` with `solution_ids` its encoding,
        unless BPE merges a token across the seam (e.g. a solution ending in `}` before `\\n\\n`).
        """
        prefix, suffix = self.teacher_sides(problem)
        solution_ids = list(solution_ids)
        limit = self.budget.max_prompt_tokens
        room = None if limit is None else limit - len(prefix) - len(suffix)
        if room is not None and 0 < room < len(solution_ids) and self.budget.overlong == "truncate_solution":
            solution_ids = solution_ids[:room]
        ids = [*prefix, *solution_ids, *suffix]
        self.budget.check_rendered(len(ids))
        return ids

    def teacher_sides(self, problem: str) -> tuple[list[int], list[int]]:
        """The teacher prompt's ids before and after `{solution}`: the chat template renders the prompt as
        text with a sentinel for the solution, and each side is tokenized as `render` tokenizes a prompt."""
        text = self.tokenizer.apply_chat_template(
            self.teacher_messages(problem, SOLUTION_SENTINEL),
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=self.teacher_enable_thinking,
            **self.template_options(),
        )
        sides = text.split(SOLUTION_SENTINEL)
        if len(sides) != 2:
            raise ValueError(
                f"the teacher prompt holds the solution {len(sides) - 1} times once rendered (expected once: "
                "context.teacher_template has one {solution}, and the problem must not contain "
                f"{SOLUTION_SENTINEL!r})"
            )
        prefix, suffix = sides
        encode = self.tokenizer.encode
        return encode(prefix, add_special_tokens=False), encode(suffix, add_special_tokens=False)

    def rationale_ids(self, problem: str, solution: str) -> list[int]:
        return self.render(self.rationale_messages(problem, solution), self.teacher_enable_thinking)

    def student_batch(self, problems: Sequence[str]) -> TokenBatch:
        return left_pad([self.student_ids(p) for p in problems], self.tokenizer.pad_token_id)

    def teacher_batch(
        self,
        problems: Sequence[str],
        solutions: Sequence[str],
        rationales: Sequence[str] | None = None,
    ) -> TokenBatch:
        rationales = rationales if rationales is not None else [None] * len(problems)
        ids = [self.teacher_ids(p, s, r) for p, s, r in zip(problems, solutions, rationales, strict=True)]
        return left_pad(ids, self.tokenizer.pad_token_id)

    def rationale_batch(self, problems: Sequence[str], solutions: Sequence[str]) -> TokenBatch:
        """Reason-first: prompts asking the teacher to explain each reference."""
        ids = [self.rationale_ids(p, s) for p, s in zip(problems, solutions, strict=True)]
        return left_pad(ids, self.tokenizer.pad_token_id)

    def render(self, messages: list[dict[str, str]], enable_thinking: bool) -> list[int]:
        """The one rendering path: the chat template's own ids, checked against the prompt budget."""
        ids = self.tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
            return_dict=False,
            **self.template_options(),
        )
        self.budget.check_rendered(len(ids))
        return list(ids)

    def _messages(self, user_content: str) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*messages, {"role": "user", "content": user_content}]


def _given_or_default(value: str | None, defaults: dict[str, Any], name: str) -> str:
    return defaults[name] if value is None else value
