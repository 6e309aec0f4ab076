"""A complete user datamodule for opsd-lightning (see README, "Your own datamodule").

The whole contract: a LightningDataModule whose train/val dataloaders yield RAW TEXT batches

    {"problem": list[str], "solution": list[str], "answer": list[str]}   # answer optional

The framework renders the student and teacher contexts with the model's chat template and tokenizes.
Run it from this folder with:

    opsd-train data._target_=my_datamodule.CountdownDataModule
"""

from __future__ import annotations

import random

import lightning as L
from torch.utils.data import DataLoader


def make_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Toy problems: count down from n by k; the reference solution lists every step."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        start, step = rng.randint(10, 30), rng.randint(2, 5)
        values = list(range(start, -1, -step))
        rows.append(
            {
                "problem": f"Count down from {start} in steps of {step}. "
                "What is the last number that is not negative?",
                "solution": " ".join(str(v) for v in values) + f". The answer is \\boxed{{{values[-1]}}}.",
                "answer": str(values[-1]),
            }
        )
    return rows


def collate(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    return {key: [row[key] for row in rows] for key in ("problem", "solution", "answer")}


class CountdownDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 8, eval_batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        self.train_rows = make_rows(512, self.seed)
        self.val_rows = make_rows(64, self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_rows, batch_size=self.batch_size, shuffle=True, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_rows, batch_size=self.eval_batch_size, collate_fn=collate)
