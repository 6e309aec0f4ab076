"""Benchmarks: problems with reference answers, from the hub, local files, or the synthetic task.

Every benchmark yields rows `{"id": str, "problem": str, "answer": str}`; `limit` takes a fixed-seed
subset (for quick validation during training).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from datasets import load_dataset

from opsd_lightning.data.arith import generate_examples
from opsd_lightning.data.datamodule import local_data_files

CANONICAL_COLUMNS = {"problem": "problem", "answer": "answer", "id": None}


class Benchmark:
    """A benchmark read with `datasets.load_dataset` from a hub id or from local files.

    Args:
        name: used in metric names (`val/<name>/...`) and output files.
        hub_id / subset / split: where the public evaluations load it from.
        path: local jsonl/json/parquet/csv file(s) instead of the hub; these may use the canonical
            column names `problem` / `answer` even when the hub copy names them differently.
        columns: our field (`problem`, `answer`, optional `id` and `solution`) -> source column.
        limit: evaluate a fixed-seed random subset of this many problems (None = all).
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
        if hub_id is None and path is None:
            raise ValueError(f"benchmark {name}: set `hub_id` or `path`")
        if limit is not None and limit < 1:
            raise ValueError(f"benchmark {name}: limit={limit} must be >= 1 (or null for all)")
        self.name, self.hub_id, self.subset, self.split = name, hub_id, subset, split
        self.path, self.limit, self.seed = path, limit, seed
        self.columns = {**CANONICAL_COLUMNS, **dict(columns or {})}

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else f"hub dataset {self.hub_id} (split {self.split})"

    def load(self) -> list[dict[str, str]]:
        if self.path is not None:
            files, file_format = local_data_files(self.path)
            try:
                dataset = load_dataset(file_format, data_files=files, split="train")
            except Exception as err:
                raise ValueError(f"benchmark {self.name}: cannot read {self.source}: {err}") from err
        else:
            dataset = load_dataset(self.hub_id, self.subset, split=self.split)
        available = dataset.column_names
        resolved = {}
        for field, column in self.columns.items():
            if column is None:
                continue
            if column not in available and self.path is not None and field in available:
                column = field  # a local copy in the canonical layout
            if column not in available and field == "solution":
                continue  # optional: only evaluation.context=teacher reads it
            if column not in available:
                raise ValueError(
                    f"benchmark {self.name}: {self.source} has no column {column!r} for {field!r}; "
                    f"available columns: {available}. Set benchmark.{self.name}.columns.{field}."
                )
            resolved[field] = column
        rows = [
            {
                "id": str(record[resolved["id"]]) if "id" in resolved else str(index),
                "problem": str(record[resolved["problem"]]),
                "answer": str(record[resolved["answer"]]),
            }
            | ({"solution": str(record[resolved["solution"]])} if "solution" in resolved else {})
            for index, record in enumerate(dataset)
        ]
        return take_subset(rows, self.limit, self.seed)


class ArithBenchmark:
    """The synthetic task's held-out problems: the same ones as `data=arith`'s validation split."""

    def __init__(
        self,
        name: str = "arith",
        num_problems: int = 200,
        num_steps: Sequence[int] = (2, 3),
        max_start: int = 12,
        max_change: int = 6,
        limit: int | None = None,
        seed: int = 0,
    ) -> None:
        self.name, self.num_problems, self.limit, self.seed = name, num_problems, limit, seed
        self.task = (list(num_steps), max_start, max_change)

    @property
    def source(self) -> str:
        return f"synthetic arithmetic (seed {self.seed})"

    def load(self) -> list[dict[str, str]]:
        # Same stream as ArithDataModule's validation split, so training never sees these problems.
        rows = generate_examples(self.num_problems, self.seed * 2 + 1, *self.task)
        rows = [{"id": str(index), **row} for index, row in enumerate(rows)]
        return take_subset(rows, self.limit, self.seed)


def take_subset(rows: list[dict[str, str]], limit: int | None, seed: int) -> list[dict[str, str]]:
    """A fixed-seed random subset, in the original order (so ids stay sorted)."""
    if limit is None or limit >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[index] for index in keep]
