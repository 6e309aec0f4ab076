"""A datamodule wrapper that keeps the user's training data and evaluates on benchmarks.

Training batches come from the wrapped datamodule unchanged; the validation and test loops get one
dataloader per benchmark (Lightning's multiple-dataloader evaluation), so metrics are per benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader

from opsd_lightning.evaluation.benchmarks import Benchmark, Row


def collate_problems(rows: list[Row]) -> dict[str, list[str]]:
    """Problems for scoring; `solution` only when every row has one (for evaluation.context=teacher)."""
    batch = {key: [row[key] for row in rows] for key in ("id", "problem", "answer")}
    if rows and all(row.get("solution") for row in rows):
        batch["solution"] = [row["solution"] for row in rows]
    return batch


def problem_batches(rows: list[Row], problems_per_batch: int | None) -> DataLoader:
    """Benchmark rows in evaluation batches, in order (None: all rows in one batch)."""
    return DataLoader(rows, batch_size=problems_per_batch or max(1, len(rows)), collate_fn=collate_problems)


class WithBenchmarks(L.LightningDataModule):
    """Training from `datamodule`, validation/test on `benchmarks` (one dataloader each).

    The trainer Lightning attaches to this wrapper is the wrapped datamodule's too: the training data
    needs it for its shard under DDP and for the data position saved in checkpoints.
    """

    def __init__(
        self,
        datamodule: L.LightningDataModule,
        benchmarks: Sequence[Benchmark],
        problems_per_batch: int | None,
    ) -> None:
        self.datamodule = datamodule  # first: LightningDataModule.__init__ sets `trainer`, forwarded to it
        super().__init__()
        self.benchmarks = list(benchmarks)
        self.problems_per_batch = problems_per_batch
        self.rows: dict[str, list[Row]] = {}

    @property
    def trainer(self) -> L.Trainer | None:
        return self.datamodule.trainer

    @trainer.setter
    def trainer(self, trainer: L.Trainer | None) -> None:
        self.datamodule.trainer = trainer

    @property
    def names(self) -> list[str]:
        return [benchmark.name for benchmark in self.benchmarks]

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.setup(stage)
        for benchmark in self.benchmarks:
            if benchmark.name not in self.rows:
                self.rows[benchmark.name] = benchmark.load(self.datamodule)

    def train_dataloader(self):
        return self.datamodule.train_dataloader()

    def val_dataloader(self) -> list[DataLoader]:
        return [problem_batches(self.rows[name], self.problems_per_batch) for name in self.names]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def state_dict(self) -> dict:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.datamodule.load_state_dict(state_dict)
