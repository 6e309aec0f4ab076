"""The built-in synthetic task: multi-step arithmetic word problems with step-by-step references.

Everything is generated from a seed, so the task needs no files and no network. Each example has a
`problem`, a reference `solution` that works through the steps and ends in `\\boxed{answer}`, and the
`answer`. Validation problems never repeat a training problem.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from opsd_lightning.data.datamodule import RawTextDataModule

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


def make_example(rng: random.Random, num_steps: int, max_start: int, max_change: int) -> dict[str, str]:
    """One problem: a starting amount changed `num_steps` times by gains and losses (never below 0)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(1, max_start)
    sentences = [f"{name} has {total} {item}."]
    steps = [f"{name} starts with {total} {item}."]
    for index in range(num_steps):
        gain = total == 0 or rng.random() < 0.5
        amount = rng.randint(1, max_change if gain else min(max_change, total))
        phrase = rng.choice(GAIN_PHRASES if gain else LOSS_PHRASES).format(n=amount)
        sentences.append(f"{'Then ' if index else ''}{name} {phrase}.")
        new_total = total + amount if gain else total - amount
        steps.append(f"{total} {'+' if gain else '-'} {amount} = {new_total}.")
        total = new_total
    sentences.append(f"How many {item} does {name} have now?")
    solution = " ".join(steps) + f" The answer is \\boxed{{{total}}}."
    return {"problem": " ".join(sentences), "solution": solution, "answer": str(total)}


def generate_examples(
    count: int,
    seed: int,
    num_steps: Sequence[int] = (2, 3),
    max_start: int = 30,
    max_change: int = 20,
    exclude: set[str] | None = None,
) -> list[dict[str, str]]:
    """`count` distinct examples from `seed`, skipping any problem text in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    examples: list[dict[str, str]] = []
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(
                f"data: cannot draw {count} distinct arithmetic problems with num_steps={list(num_steps)}, "
                f"max_start={max_start}, max_change={max_change}; raise the ranges or lower the sizes"
            )
        example = make_example(rng, rng.choice(list(num_steps)), max_start, max_change)
        if example["problem"] not in seen:
            seen.add(example["problem"])
            examples.append(example)
    return examples


class ArithDataModule(RawTextDataModule):
    """Deterministic synthetic arithmetic word problems (`data=arith`)."""

    def __init__(
        self,
        train_size: int = 4000,
        val_size: int = 200,
        num_steps: Sequence[int] = (2, 3),
        max_start: int = 30,
        max_change: int = 20,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed
        )
        self.train_size, self.val_size = train_size, val_size
        self.num_steps, self.max_start, self.max_change = list(num_steps), max_start, max_change

    def build_splits(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        # Validation is drawn first from its own stream so it does not change when train_size does.
        val = generate_examples(
            self.val_size, self.seed * 2 + 1, self.num_steps, self.max_start, self.max_change
        )
        held_out = {example["problem"] for example in val}
        train = generate_examples(
            self.train_size, self.seed * 2, self.num_steps, self.max_start, self.max_change, exclude=held_out
        )
        return train, val
