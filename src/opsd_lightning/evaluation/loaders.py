"""A datamodule wrapper that keeps the user's training data and evaluates on benchmarks.

Training batches come from the wrapped datamodule unchanged; the validation and test loops get one
dataloader per benchmark (Lightning's multiple-dataloader evaluation), so metrics are per benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader

from opsd_lightning.evaluation.benchmarks import take_subset


class HeldOutSplit:
    """The training datamodule's own validation split, as a benchmark named `heldout`."""

    def __init__(self, name: str = "heldout", limit: int | None = None, seed: int = 0) -> None:
        self.name, self.limit, self.seed = name, limit, seed

    @property
    def source(self) -> str:
        return "the datamodule's validation split"

    def load_from(self, datamodule: L.LightningDataModule) -> list[dict[str, str]]:
        rows = getattr(datamodule, "val_rows", None)
        if rows is None:  # any LightningDataModule: read its validation batches
            rows = [
                {key: batch[key][i] for key in ("problem", "answer", "solution") if key in batch}
                for batch in datamodule.val_dataloader()
                for i in range(len(batch["problem"]))
            ]
        if not rows:
            raise ValueError("benchmark heldout: the datamodule has no validation rows (set its val size)")
        rows = [
            {"id": str(i), "problem": r["problem"], "answer": r.get("answer", "")}
            | ({"solution": r["solution"]} if r.get("solution") else {})
            for i, r in enumerate(rows)
        ]
        return take_subset(rows, self.limit, self.seed)


def collate_problems(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    """Problems for scoring; `solution` only when every row has one (for evaluation.context=teacher)."""
    batch = {key: [row[key] for row in rows] for key in ("id", "problem", "answer")}
    if rows and all(row.get("solution") for row in rows):
        batch["solution"] = [row["solution"] for row in rows]
    return batch


class WithBenchmarks(L.LightningDataModule):
    """Training from `datamodule`, validation/test on `benchmarks` (one dataloader each)."""

    def __init__(
        self, datamodule: L.LightningDataModule, benchmarks: Sequence, problems_per_batch: int
    ) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.benchmarks = list(benchmarks)
        self.problems_per_batch = problems_per_batch
        self.rows: dict[str, list[dict[str, str]]] = {}

    @property
    def names(self) -> list[str]:
        return [benchmark.name for benchmark in self.benchmarks]

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.setup(stage)
        for benchmark in self.benchmarks:
            if benchmark.name not in self.rows:
                load = getattr(benchmark, "load_from", None)
                self.rows[benchmark.name] = load(self.datamodule) if load else benchmark.load()

    def train_dataloader(self):
        return self._inner().train_dataloader()

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(self.rows[name], batch_size=self.problems_per_batch, collate_fn=collate_problems)
            for name in self.names
        ]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def state_dict(self) -> dict:
        return self._inner().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._inner().load_state_dict(state_dict)

    def _inner(self) -> L.LightningDataModule:
        # Lightning attaches the trainer to this wrapper only; the training data needs it too, for its
        # shard under DDP and for the data position saved in checkpoints.
        self.datamodule.trainer = self.trainer
        return self.datamodule
