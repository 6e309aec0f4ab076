"""Student and teacher contexts: chat-template rendering, left padding, and `[prompt | completion]` batches.

Both contexts are rendered by the tokenizer's own chat template straight to token ids; completion ids
are appended as ids, never decoded and re-encoded, so the teacher scores exactly the student's tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

# The paper's student prompt (the usual Qwen math instruction).
DEFAULT_STUDENT_TEMPLATE = (
    "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
)
# The teacher sees the verified reference, then a transition instruction to reason on its own.
DEFAULT_TEACHER_TEMPLATE = (
    "{problem}\n\n"
    "Here is a reference solution to this problem:\n{solution}\n\n"
    "After reading the reference solution above, make sure you understand the reasoning behind each step. "
    "Now solve the problem yourself, step by step, and reach the same final answer. "
    "Please reason step by step, and put your final answer within \\boxed{}."
)

# Reason-first (optional): the teacher first explains the reference in its own words; the explanation
# then stays in its context, and a follow-up turn asks it to solve the problem (the scored turn).
DEFAULT_RATIONALE_TEMPLATE = (
    "{problem}\n\n"
    "Here is a reference solution to this problem:\n{solution}\n\n"
    "Explain the reasoning behind each step of the reference solution."
)
DEFAULT_RATIONALE_FOLLOWUP = (
    "Now solve the problem yourself, step by step, and reach the same final answer. "
    "Please reason step by step, and put your final answer within \\boxed{}."
)

_PLACEHOLDER = re.compile(r"\{(problem|solution)\}")


def fill_template(template: str, **fields: str) -> str:
    """Replace `{problem}` / `{solution}` in one pass, leaving every other brace (LaTeX) alone."""
    return _PLACEHOLDER.sub(lambda match: fields[match.group(1)], template)


@dataclass
class TokenBatch:
    """Left-padded token ids with their attention mask, `[B, L]` each."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def rows(self, rows: slice) -> TokenBatch:
        """A slice of rows, without the padding columns no row in it needs."""
        mask = self.attention_mask[rows]
        lengths = mask.sum(-1)
        width = int(lengths.max()) if len(lengths) else 0
        return TokenBatch(self.input_ids[rows, mask.shape[1] - width :], mask[:, mask.shape[1] - width :])


@dataclass
class ScoringBatch:
    """`[prompt | completion]` for one context, ready for a forward pass.

    `logit_slice` selects the positions whose next-token logits predict completion tokens 0..Lc-1:
    prompts are left-padded to a common width, so it is the same slice for every example.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    logit_slice: slice


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Stack id lists into a left-padded batch (generation needs the prompt's last token aligned)."""
    width = max((len(ids) for ids in sequences), default=0)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return TokenBatch(input_ids, attention_mask)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded example starts at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_scoring_batch(
    prompt: TokenBatch, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> ScoringBatch:
    """Append completion ids to a left-padded prompt batch.

    The result is `[pads | prompt | completion | trailing pads]`: no padding in the middle, so causal
    attention plus the mask is exact. Logits at index `Lp - 1 + j` predict completion token `j`.
    """
    prompt_width = prompt.input_ids.shape[1]
    input_ids = torch.cat([prompt.input_ids, completion_ids.to(prompt.input_ids.device)], dim=1)
    attention_mask = torch.cat([prompt.attention_mask, completion_mask.to(prompt.attention_mask)], dim=1)
    return ScoringBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logit_slice=slice(prompt_width - 1, prompt_width - 1 + completion_ids.shape[1]),
    )


OVERLONG_POLICIES = ("truncate_solution", "drop", "raise")


class ContextRenderer:
    """Renders the student context `c_S(x)` and the teacher context `c_T(x, y*)` with the chat template.

    Args:
        student_template: user message for the student; `{problem}` is filled in.
        teacher_template: user message for the teacher; `{problem}` and `{solution}` are filled in.
        system_prompt: optional system message for both contexts.
        student_enable_thinking / teacher_enable_thinking: passed to the chat template independently.
        max_prompt_tokens: the longest prompt (student or teacher) in tokens; null for no limit.
        overlong: what `fit_rows` does with a training row whose prompt is longer: `truncate_solution` cuts
            the reference solution's end until the teacher prompt fits (a student prompt over the limit
            cannot be cut: that row is dropped), `drop` drops the row, `raise` stops with an error. A prompt
            that reaches rendering still too long always raises.
        rationale_template / rationale_followup: reason-first only; the user turn asking the teacher to
            explain the reference (`{problem}`, `{solution}`), and the turn after its explanation.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        student_template: str = DEFAULT_STUDENT_TEMPLATE,
        teacher_template: str = DEFAULT_TEACHER_TEMPLATE,
        system_prompt: str | None = None,
        student_enable_thinking: bool = False,
        teacher_enable_thinking: bool = False,
        max_prompt_tokens: int | None = None,
        overlong: str = "truncate_solution",
        rationale_template: str = DEFAULT_RATIONALE_TEMPLATE,
        rationale_followup: str = DEFAULT_RATIONALE_FOLLOWUP,
    ) -> None:
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"context.overlong={overlong!r}: use one of {list(OVERLONG_POLICIES)}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"context.max_prompt_tokens={max_prompt_tokens} must be >= 1 (or null)")
        if "{problem}" not in student_template:
            raise ValueError("context.student_template must contain {problem}")
        if "{solution}" not in teacher_template:
            raise ValueError("context.teacher_template must contain {solution} (the privileged reference)")
        if tokenizer.chat_template is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; OPSD needs one")
        self.tokenizer = tokenizer
        self.student_template = student_template
        self.teacher_template = teacher_template
        self.system_prompt = system_prompt
        self.student_enable_thinking = student_enable_thinking
        self.teacher_enable_thinking = teacher_enable_thinking
        self.max_prompt_tokens = max_prompt_tokens
        self.overlong = overlong
        self.rationale_template = rationale_template
        self.rationale_followup = rationale_followup

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

    def rationale_batch(self, problems: Sequence[str], solutions: Sequence[str]) -> TokenBatch:
        """Reason-first: prompts asking the teacher to explain each reference."""
        ids = [
            self._render(self.rationale_messages(p, s), self.teacher_enable_thinking)
            for p, s in zip(problems, solutions, strict=True)
        ]
        return left_pad(ids, self.tokenizer.pad_token_id)

    def student_ids(self, problem: str) -> list[int]:
        return self._render(self.student_messages(problem), self.student_enable_thinking)

    def teacher_ids(self, problem: str, solution: str, rationale: str | None = None) -> list[int]:
        return self._render(self.teacher_messages(problem, solution, rationale), self.teacher_enable_thinking)

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

    def fit_rows(self, rows: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], dict[str, int]]:
        """Apply `overlong` to training rows whose prompt exceeds `max_prompt_tokens`; returns the rows to
        train on and the counts `{"dropped": ..., "truncated": ...}` (rows are never modified in place)."""
        counts = {"dropped": 0, "truncated": 0}
        if self.max_prompt_tokens is None:
            return list(rows), counts
        kept = []
        for index, row in enumerate(rows):
            student = len(self._render_unchecked(self.student_messages(row["problem"]), False))
            teacher = len(self._teacher_ids_unchecked(row["problem"], row["solution"]))
            if max(student, teacher) <= self.max_prompt_tokens:
                kept.append(row)
                continue
            if self.overlong == "raise":
                raise ValueError(
                    f"training row {index} has a {student}-token student prompt and a {teacher}-token "
                    f"teacher prompt, over context.max_prompt_tokens={self.max_prompt_tokens}; set "
                    "context.overlong=truncate_solution or drop, or raise the limit"
                )
            solution = self._truncated_solution(row) if self.overlong == "truncate_solution" else None
            if solution is None or student > self.max_prompt_tokens:
                counts["dropped"] += 1
            else:
                kept.append({**row, "solution": solution})
                counts["truncated"] += 1
        return kept, counts

    def _truncated_solution(self, row: dict[str, str]) -> str | None:
        """The longest prefix (in tokens) of the solution whose teacher prompt fits; None if none does."""
        tokens = self.tokenizer.encode(row["solution"], add_special_tokens=False)
        while tokens:
            excess = len(self._teacher_ids_unchecked(row["problem"], self.tokenizer.decode(tokens)))
            excess -= self.max_prompt_tokens
            if excess <= 0:
                return self.tokenizer.decode(tokens)
            tokens = tokens[:-excess]  # re-tokenising at the cut can shift a token or two: check again
        return None

    def _teacher_ids_unchecked(self, problem: str, solution: str) -> list[int]:
        return self._render_unchecked(self.teacher_messages(problem, solution), self.teacher_enable_thinking)

    def _messages(self, user_content: str) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*messages, {"role": "user", "content": user_content}]

    def _render_unchecked(self, messages: list[dict[str, str]], enable_thinking: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
            return_dict=False,
        )
        return list(ids)

    def _render(self, messages: list[dict[str, str]], enable_thinking: bool) -> list[int]:
        ids = self._render_unchecked(messages, enable_thinking)
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"a rendered prompt has {len(ids)} tokens, over context.max_prompt_tokens="
                f"{self.max_prompt_tokens} (training rows are fitted by context.overlong; this prompt came "
                "from elsewhere, e.g. a benchmark or a datamodule without train_rows)"
            )
        return ids
