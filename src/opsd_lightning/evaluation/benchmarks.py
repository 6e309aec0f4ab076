"""Benchmarks: problems with reference answers, from the hub, local files, the synthetic task, or the
training datamodule's own validation split.

Every benchmark is a `Benchmark`: `load(datamodule)` gives rows `{"id": str, "problem": str,
"answer": str}` (plus `solution` where the source has one); `limit` takes a fixed-seed subset (for quick
validation during training).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import lightning as L
from datasets import load_dataset

from opsd_lightning.data.arith import HELDOUT_SIZE, MAX_CHANGE, MAX_START, NUM_STEPS, ArithTask
from opsd_lightning.data.sources import local_data_files, resolve_columns

Row = dict[str, str]
CANONICAL_COLUMNS = {"problem": "problem", "answer": "answer", "id": None}
OPTIONAL_COLUMNS = ("solution",)  # only evaluation.context=teacher reads it


class Benchmark(ABC):
    """What every benchmark is: a `name` (metrics are `val/<name>/...`) and its rows.

    Args:
        name: used in metric names and output files.
        limit: evaluate a fixed-seed random subset of this many problems (None = all).
        seed: the subset's seed.
    """

    def __init__(self, name: str, limit: int | None = None, seed: int = 0) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"benchmark {name}: limit={limit} must be >= 1 (or null for all)")
        self.name, self.limit, self.seed = name, limit, seed

    def load(self, datamodule: L.LightningDataModule | None = None) -> list[Row]:
        """The rows to evaluate; `datamodule` is the run's (set up) training data, which only the
        held-out split reads."""
        return take_subset(self.rows(datamodule), self.limit, self.seed)

    @abstractmethod
    def rows(self, datamodule: L.LightningDataModule | None) -> list[Row]:
        """Every problem of the benchmark, ids in order."""


class DatasetBenchmark(Benchmark):
    """A benchmark read with `datasets.load_dataset` from a hub id or from local files.

    Args:
        hub_id / subset / split: where the public evaluations load it from.
        path: local jsonl/json/parquet/csv file(s) instead of the hub; these may use the canonical
            column names `problem` / `answer` even when the hub copy names them differently.
        columns: our field (`problem`, `answer`, optional `id` and `solution`) -> source column.
        name / limit / seed: see `Benchmark`.
    """

    def __init__(
        self,
        name: str,
        hub_id: str | None = None,
        subset: str | None = None,
        split: str = "test",
        path: str | Sequence[str] | None = None,
        columns: Mapping[str, str | None] | None = None,
        limit: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(name, limit, seed)
        if hub_id is None and path is None:
            raise ValueError(f"benchmark {name}: set `hub_id` or `path`")
        self.hub_id, self.subset, self.split, self.path = hub_id, subset, split, path
        self.columns = {**CANONICAL_COLUMNS, **dict(columns or {})}

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else f"hub dataset {self.hub_id} (split {self.split})"

    def rows(self, datamodule: L.LightningDataModule | None = None) -> list[Row]:
        if self.path is not None:
            files, file_format = local_data_files(self.path)
            try:
                dataset = load_dataset(file_format, data_files=files, split="train")
            except Exception as err:
                raise ValueError(f"benchmark {self.name}: cannot read {self.source}: {err}") from err
        else:
            dataset = load_dataset(self.hub_id, self.subset, split=self.split)
        resolved = resolve_columns(
            self.columns,
            dataset.column_names,
            f"benchmark {self.name}: {self.source}",
            f"benchmark.{self.name}.columns",
            optional=OPTIONAL_COLUMNS,
            canonical_fallback=self.path is not None,
        )
        return [
            {
                "id": str(record[resolved["id"]]) if resolved["id"] else str(index),
                "problem": str(record[resolved["problem"]]),
                "answer": str(record[resolved["answer"]]),
            }
            | ({"solution": str(record[resolved["solution"]])} if resolved.get("solution") else {})
            for index, record in enumerate(dataset)
        ]


class ArithBenchmark(Benchmark):
    """The synthetic task's held-out problems: the same ones as `data=arith`'s validation split (the
    config takes the data's task and task seed)."""

    def __init__(
        self,
        name: str = "arith",
        num_problems: int = HELDOUT_SIZE,
        num_steps: Sequence[int] = NUM_STEPS,
        max_start: int = MAX_START,
        max_change: int = MAX_CHANGE,
        limit: int | None = None,
        seed: int = 0,
        task_seed: int | None = None,
    ) -> None:
        super().__init__(name, limit, seed)
        self.num_problems = num_problems
        knobs = {"num_steps": tuple(num_steps), "max_start": max_start, "max_change": max_change}
        self.task = ArithTask.of_run(seed, task_seed, **knobs)

    def rows(self, datamodule: L.LightningDataModule | None = None) -> list[Row]:
        return [
            {"id": str(index), **row} for index, row in enumerate(self.task.heldout_rows(self.num_problems))
        ]


class HeldOutSplit(Benchmark):
    """The training datamodule's own validation split, as a benchmark named `heldout`."""

    def __init__(self, name: str = "heldout", limit: int | None = None, seed: int = 0) -> None:
        super().__init__(name, limit, seed)

    def rows(self, datamodule: L.LightningDataModule | None) -> list[Row]:
        if datamodule is None:
            raise ValueError(f"benchmark {self.name} is the training datamodule's validation split: pass it")
        rows = getattr(datamodule, "val_rows", None)
        if rows is None:  # any LightningDataModule: read its validation batches
            rows = [
                {key: batch[key][i] for key in ("problem", "answer", "solution") if key in batch}
                for batch in datamodule.val_dataloader()
                for i in range(len(batch["problem"]))
            ]
        if not rows:
            raise ValueError("benchmark heldout: the datamodule has no validation rows (set its val size)")
        return [
            {"id": str(i), "problem": r["problem"], "answer": r.get("answer", "")}
            | ({"solution": r["solution"]} if r.get("solution") else {})
            for i, r in enumerate(rows)
        ]


def take_subset(rows: list[Row], limit: int | None, seed: int) -> list[Row]:
    """A fixed-seed random subset, in the original order (so ids stay sorted)."""
    if limit is None or limit >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[index] for index in keep]
