"""The tiny base's tool habit (`warmup.tools=true`, set by data=arith_tools): warm-up episodes in which the
base solves an arithmetic word problem by calling `calculator` once per step, in the Qwen3 tool-call format,
then writes the answer.

Like the single-turn base, it slips: a call's operand is off by 1-3 (the calculator then computes the wrong
sum exactly, and the chain carries on from it), or a step is skipped. In the teacher format (the reference
solution in its prompt) the calls are right. Tool responses and the template's scaffolding are never targets:
the loss mask is the model's tokens, as in training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.data.arith import ArithProblem
from opsd_lightning.environments.base import ArithToolsEnvironment
from opsd_lightning.environments.calculator import evaluate, format_number
from opsd_lightning.environments.format import ToolFormat

SLIPS = (-3, -2, -1, 1, 2, 3)


def tool_schemas() -> list[dict]:
    return ArithToolsEnvironment().toolbox.schemas()


def call_text(expression: str) -> str:
    """A calculator call as the chat template writes one (`tojson` of the arguments)."""
    arguments = json.dumps({"expression": expression}, ensure_ascii=False)
    return f'<tool_call>\n{{"name": "calculator", "arguments": {arguments}}}\n</tool_call>'


def tool_episode(problem: ArithProblem, rng: random.Random, slip_rate: float) -> tuple[list[str], int]:
    """The calls' expressions, one per step (an operand off by 1-3, or a step skipped, with `slip_rate`
    each way between them), and the total the chain ends at."""
    total, expressions = problem.start, []
    for change in problem.changes:
        draw = rng.random()
        if draw < slip_rate / 4:
            continue  # a skipped step
        amount = abs(change) + (rng.choice(SLIPS) if draw < slip_rate else 0)
        amount = max(amount, 1)
        expression = f"{total} {'+' if change > 0 else '-'} {amount}"
        value = evaluate(expression)
        expressions.append(expression)
        total = int(value) if value >= 0 else 0
    return expressions, total


def tool_warmup_pair(
    problem: ArithProblem,
    renderer: ContextRenderer,
    tokenizer: PreTrainedTokenizerBase,
    fmt: ToolFormat,
    rng: random.Random,
    teacher_fraction: float,
    slip_rate: float,
    reference_style: str,
) -> tuple[list[int], list[int], list[bool]]:
    """One warm-up episode: (prompt ids, completion ids, loss mask over the completion)."""
    teacher = rng.random() < teacher_fraction
    expressions, total = tool_episode(problem, rng, 0.0 if teacher else slip_rate)
    ids: list[int] = []
    mask: list[bool] = []
    for expression in expressions:
        turn = tokenizer.encode(call_text(expression), add_special_tokens=False)
        response = fmt.response_ids(format_number(evaluate(expression)))
        ids += turn + response
        mask += [True] * len(turn) + [False] * len(response)
    answer = tokenizer.encode(f"The answer is \\boxed{{{total}}}.", add_special_tokens=False)
    ids += [*answer, tokenizer.eos_token_id]
    mask += [True] * (len(answer) + 1)
    if teacher:
        prompt = renderer.teacher_ids(problem.problem_text(), problem.reference_text(reference_style))
    else:
        prompt = renderer.student_ids(problem.problem_text())
    return prompt, ids, mask


def tool_corpus(problems: Sequence[ArithProblem], tools_prompt: str) -> list[str]:
    """Text for the tokenizer's merges: the calls the base will write, and the tools' system prompt
    (`tools_prompt`, in every prompt: repeated, so it gets merges as the prompt templates do)."""
    rng = random.Random(0)
    return [call_text(e) for p in problems[:2000] for e in tool_episode(p, rng, 0.0)[0]] + [
        tools_prompt
    ] * 200


def tools_prompt(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the chat template renders for the calculator's tools (the system turn of every prompt)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], tools=tool_schemas(), tokenize=False
    )
