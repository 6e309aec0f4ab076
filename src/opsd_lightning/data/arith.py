"""The built-in synthetic task: multi-step arithmetic word problems with step-by-step references.

Everything is generated from a seed, so the task needs no files and no network. Each example has a
`problem`, a reference `solution` that works through the steps and ends in `\\boxed{answer}`, and the
`answer`. Validation problems never repeat a training problem.

The task's knobs (`num_steps`, `max_start`, `max_change`) and its held-out size are stated for the
configs in `conf/data/shared/arith_task.yaml` and `conf/data/arith.yaml`; the defaults below are the same
values (a test keeps them equal).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from opsd_lightning.data.datamodule import RawTextDataModule

NUM_STEPS = (2, 3)
MAX_START = 12
MAX_CHANGE = 6
HELDOUT_SIZE = 200

NAMES = [
    "Ava",
    "Ben",
    "Cleo",
    "Dan",
    "Emma",
    "Finn",
    "Gia",
    "Hugo",
    "Ines",
    "Jack",
    "Kai",
    "Lena",
    "Mia",
    "Noah",
]
ITEMS = ["apples", "books", "coins", "marbles", "stamps", "cards", "shells", "pencils", "stickers", "cookies"]
GAIN_PHRASES = ["buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more"]
LOSS_PHRASES = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}"]


@dataclass(frozen=True)
class ArithProblem:
    """A starting amount changed by signed amounts (a gain is positive); never below zero."""

    name: str
    item: str
    start: int
    changes: tuple[int, ...]
    phrases: tuple[str, ...]

    @property
    def answer(self) -> int:
        return self.start + sum(self.changes)

    def problem_text(self) -> str:
        sentences = [f"{self.name} has {self.start} {self.item}."]
        for index, phrase in enumerate(self.phrases):
            sentences.append(f"{'Then ' if index else ''}{self.name} {phrase}.")
        sentences.append(f"How many {self.item} does {self.name} have now?")
        return " ".join(sentences)

    def reference_text(self, style: str = "steps") -> str:
        """The reference solution in a given style.

        `steps` is the base model's own style (running totals). `net_change` is "another model's": it
        sums the changes first and applies them once, a different order with different intermediate
        values, so SFT on it pulls the model off its own way of solving.
        """
        if style == "steps":
            return self.solution_text()
        if style == "net_change":
            signed = " ".join(f"{'+' if c > 0 else '-'} {abs(c)}" for c in self.changes).lstrip("+ ")
            net = sum(self.changes)
            return (
                f"The changes add up to {signed} = {net}. "
                f"So {self.name} has {self.start} {'+' if net >= 0 else '-'} {abs(net)} = {self.answer}. "
                f"Final answer: \\boxed{{{self.answer}}}."
            )
        raise ValueError(f"reference_style={style!r}: use 'steps' or 'net_change'")

    def solution_text(self, slips: Sequence[int] | None = None) -> str:
        """The step-by-step solution (see `solution_with_slips`)."""
        return self.solution_with_slips(slips)[0]

    def solution_with_slips(self, slips: Sequence[int] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """The solution and the character spans of slipped results.

        `slips[i]` adds an arithmetic error to step i's result, and the chain carries on from the wrong
        value: that is how a weak reasoner goes wrong.
        """
        total = self.start
        text = f"{self.name} starts with {total} {self.item}."
        spans: list[tuple[int, int]] = []
        for index, change in enumerate(self.changes):
            slip = slips[index] if slips else 0
            result = max(0, total + change + slip)
            text += f" {total} {'+' if change > 0 else '-'} {abs(change)} = "
            if result != total + change:
                spans.append((len(text), len(text) + len(str(result))))
            text += f"{result}."
            total = result
        return text + f" The answer is \\boxed{{{total}}}.", spans


def make_problem(rng: random.Random, num_steps: int, max_start: int, max_change: int) -> ArithProblem:
    """Draw one problem: `num_steps` gains or losses applied to a starting amount."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(1, max_start)
    start, changes, phrases = total, [], []
    for _ in range(num_steps):
        gain = total == 0 or rng.random() < 0.5
        amount = rng.randint(1, max_change if gain else min(max_change, total))
        phrases.append(rng.choice(GAIN_PHRASES if gain else LOSS_PHRASES).format(n=amount))
        changes.append(amount if gain else -amount)
        total += changes[-1]
    return ArithProblem(name, item, start, tuple(changes), tuple(phrases))


def slipped_solution(
    problem: ArithProblem, rng: random.Random, slip_rate: float
) -> tuple[str, list[tuple[int, int]]]:
    """A solution in which each step's result is off by 1-3 with probability `slip_rate`, and the
    character spans of the slipped results."""
    slips = [rng.choice([-3, -2, -1, 1, 2, 3]) if rng.random() < slip_rate else 0 for _ in problem.changes]
    return problem.solution_with_slips(slips)


def generate_problems(
    count: int,
    seed: int,
    num_steps: Sequence[int] = NUM_STEPS,
    max_start: int = MAX_START,
    max_change: int = MAX_CHANGE,
    exclude: set[str] | None = None,
) -> list[ArithProblem]:
    """`count` distinct problems from `seed`, skipping any problem text in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    problems: list[ArithProblem] = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(
                f"data: cannot draw {count} distinct arithmetic problems with num_steps={list(num_steps)}, "
                f"max_start={max_start}, max_change={max_change}; raise the ranges or lower the sizes"
            )
        problem = make_problem(rng, rng.choice(list(num_steps)), max_start, max_change)
        text = problem.problem_text()
        if text not in seen:
            seen.add(text)
            problems.append(problem)
    return problems


def to_row(problem: ArithProblem, reference_style: str = "steps") -> dict[str, str]:
    """The raw-text row every datamodule yields: problem, reference solution, answer."""
    return {
        "problem": problem.problem_text(),
        "solution": problem.reference_text(reference_style),
        "answer": str(problem.answer),
    }


def generate_examples(
    count: int, seed: int, *args, reference_style: str = "steps", **kwargs
) -> list[dict[str, str]]:
    """`generate_problems` as raw-text rows."""
    return [to_row(problem, reference_style) for problem in generate_problems(count, seed, *args, **kwargs)]


@dataclass(frozen=True)
class ArithTask:
    """The problems of one task seed: a held-out stream and a training stream, drawn from two seeds.

    The held-out problems come from their own stream, so they do not change when the training size does,
    and the training stream skips them. `data=arith`'s validation split and `benchmark=arith` both read
    the held-out stream from here.
    """

    seed: int
    num_steps: tuple[int, ...] = NUM_STEPS
    max_start: int = MAX_START
    max_change: int = MAX_CHANGE
    reference_style: str = "steps"

    @classmethod
    def of_run(cls, seed: int, task_seed: int | None, **knobs) -> ArithTask:
        """The task of a run: `task_seed` fixes the problems; left as None, the run's `seed` does."""
        return cls(seed=seed if task_seed is None else task_seed, **knobs)

    def heldout_rows(self, count: int) -> list[dict[str, str]]:
        return self._rows(count, self.seed * 2 + 1)

    def training_rows(self, count: int, heldout: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        return self._rows(count, self.seed * 2, exclude={row["problem"] for row in heldout})

    def _rows(self, count: int, stream_seed: int, exclude: set[str] | None = None) -> list[dict[str, str]]:
        knobs = (self.num_steps, self.max_start, self.max_change)
        return generate_examples(
            count, stream_seed, *knobs, exclude=exclude, reference_style=self.reference_style
        )


class ArithDataModule(RawTextDataModule):
    """Deterministic synthetic arithmetic word problems (`data=arith`)."""

    def __init__(
        self,
        train_size: int = 4000,
        val_size: int = HELDOUT_SIZE,
        num_steps: Sequence[int] = NUM_STEPS,
        max_start: int = MAX_START,
        max_change: int = MAX_CHANGE,
        reference_style: str = "steps",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        task_seed: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed
        )
        # The problems (and so the held-out set and the warm-up base) follow `task_seed`; `seed` alone
        # then varies only the training order, so a sweep over seeds can share one base model.
        self.task = ArithTask.of_run(
            seed,
            task_seed,
            num_steps=tuple(num_steps),
            max_start=max_start,
            max_change=max_change,
            reference_style=reference_style,
        )
        self.train_size, self.val_size = train_size, val_size

    def build_splits(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        val = self.task.heldout_rows(self.val_size)
        return self.task.training_rows(self.train_size, heldout=val), val
