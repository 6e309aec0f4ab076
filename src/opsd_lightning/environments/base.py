"""Environments: a task the policy acts in, declared in one class.

An environment states its tools, how long an episode may go on (`max_turns`, `max_tokens`), the reward of a
finished episode, and what the teacher reads as its privileged context. The multi-turn sampler
(`rollout/multi_turn.py`) runs it: the model writes until it closes a tool call or ends its answer; a call is
executed by the environment's `ToolBox` and its response appended as the chat template renders it.

- `MathEnvironment`: no tools, one turn, graded by `evaluation/grading.py` (today's single-turn task).
- `ArithToolsEnvironment`: the arithmetic word problems with the `calculator` (`data=arith_tools`).
"""

from __future__ import annotations

from collections.abc import Sequence

from opsd_lightning.environments.calculator import Calculator
from opsd_lightning.environments.tools import Tool, ToolBox
from opsd_lightning.evaluation.grading import extract_answer, grade


class Environment:
    """Subclass it to add a task: set `tools`, define `reward`, and optionally `privileged_context`.

    Args:
        max_turns: model turns per episode (a turn ends at a closed tool call or the end of the answer), >= 1.
        max_tokens: completion tokens per episode, the model's and the environment's together; None: the
            run's `algorithm.sampling.max_new_tokens`. An episode over it is truncated (and counted).
        tool_timeout_s: the time limit of one tool call; over it, the model reads an error.
    """

    # The tools the model may call (their schemas are rendered into the prompts by the chat template).
    tools: Sequence[Tool] = ()

    def __init__(
        self, max_turns: int = 4, max_tokens: int | None = None, tool_timeout_s: float = 2.0
    ) -> None:
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"environment.max_turns={max_turns} must be an integer >= 1 (1 = a single turn)")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(
                f"environment.max_tokens={max_tokens} must be >= 1 (or null: the sampling budget)"
            )
        if type(self).reward is Environment.reward:
            raise ValueError(
                f"environment {type(self).__name__} defines no reward: override `reward(text, answer)` "
                "(e.g. subclass MathEnvironment, which grades the last \\boxed{} answer)"
            )
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.toolbox = ToolBox(list(self.tools), tool_timeout_s)

    def reward(self, text: str, answer: str | None) -> float:
        """The reward of a finished episode: `text` is the model's own tokens decoded (no tool responses)."""
        raise NotImplementedError

    def privileged_context(self, problem: str, solution: str | None) -> str | None:
        """What the teacher reads in place of `{solution}` (teacher_context=reference): by default the
        reference solution."""
        return solution


class MathEnvironment(Environment):
    """Math with a reference answer: reward 1 when the last `\\boxed{}` grades equal to it. Without tools and
    with `max_turns=1` it is today's single-turn task."""

    def __init__(
        self, max_turns: int = 1, max_tokens: int | None = None, tool_timeout_s: float = 2.0
    ) -> None:
        super().__init__(max_turns, max_tokens, tool_timeout_s)

    def reward(self, text: str, answer: str | None) -> float:
        return float(answer is not None and grade(extract_answer(text), answer))


class ArithToolsEnvironment(MathEnvironment):
    """The arithmetic word problems with a `calculator` (exact integers and fractions)."""

    tools = (Calculator(),)

    def __init__(
        self, max_turns: int = 4, max_tokens: int | None = None, tool_timeout_s: float = 2.0
    ) -> None:
        super().__init__(max_turns, max_tokens, tool_timeout_s)
