"""Raw-text data modules: every batch is `{"problem", "solution", "answer"}` as lists of str.

Chat templates and tokenization happen in the algorithm module, so data modules stay tokenizer-free and
any source that yields these three fields can be swapped in from the `data` config group. The one use of
the run's renderer here is the prompt budget: `connect(renderer)` hands it over, and `setup` fits the
training rows to `context.max_prompt_tokens` once.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING

import lightning as L
import torch
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader

from opsd_lightning.contexts.budget import fit_rows
from opsd_lightning.data.file_errors import describe_error, find_bad_file
from opsd_lightning.data.sampler import ResumableRandomSampler
from opsd_lightning.data.sources import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    BadRowFound,
    local_data_files,
    merge_columns,
    resolve_columns,
    to_rows,
)

if TYPE_CHECKING:
    from opsd_lightning.contexts.renderer import ContextRenderer

logger = logging.getLogger(__name__)

# What to do with a row whose problem or solution is null, empty or whitespace-only.
BAD_ROW_POLICIES = ("skip", "raise")


def collate_raw_text(rows: list[dict]) -> dict[str, list[str]]:
    """Turn rows into one batch of parallel lists; a row without `answer` gets ""."""
    batch = {field: [row[field] for row in rows] for field in REQUIRED_FIELDS}
    batch.update({field: [row.get(field, "") for row in rows] for field in OPTIONAL_FIELDS})
    return batch


class RawTextDataModule(L.LightningDataModule, ABC):
    """Base data module: subclasses build the rows, this class batches them as raw text.

    `build_splits` returns (train rows, validation rows), each row a dict with str `problem`, `solution`
    and `answer`. Training order is shuffled with a generator seeded from `seed`, so it is reproducible
    and independent of the global RNG; validation and test (the validation rows) keep their order.
    """

    def __init__(
        self, batch_size: int = 8, eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(
                f"batch_size and eval_batch_size must be >= 1, got {batch_size} and {eval_batch_size}"
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_rows: Sequence[dict[str, str]] | None = None
        self.val_rows: Sequence[dict[str, str]] | None = None
        self.renderer: ContextRenderer | None = None
        # What the prompt budget did to the training rows: {"dropped": n, "truncated": n}; None until
        # `setup` has applied a connected renderer's limit.
        self.overlong_counts: dict[str, int] | None = None
        self._resume: dict[str, int] | None = None

    def connect(self, renderer: ContextRenderer) -> None:
        """Hand over the run's prompt renderer: the next `setup` fits the training rows to its prompt
        budget (`context.max_prompt_tokens` and `context.overlong`), once, and keeps the counts."""
        self.renderer = renderer

    def state_dict(self) -> dict[str, int]:
        """The data position, saved in checkpoints: the epoch and the batches of it already trained on."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict) if state_dict else None

    @abstractmethod
    def build_splits(self) -> tuple[Sequence[dict[str, str]], Sequence[dict[str, str]]]:
        """Return (train rows, validation rows); each row has str `problem`, `solution` and `answer`."""

    def setup(self, stage: str | None = None) -> None:
        # Lightning calls setup for every stage (fit, validate, test); the rows are the same for all.
        if self.train_rows is None:
            self.train_rows, self.val_rows = self.build_splits()
        limit = self.renderer.budget.max_prompt_tokens if self.renderer is not None else None
        if limit is not None and self.overlong_counts is None:  # once: the fitted rows replace the rows
            self.overlong_counts = self._fit_training_rows(self.renderer)

    def _fit_training_rows(self, renderer: ContextRenderer) -> dict[str, int]:
        """Apply `context.overlong` to the training rows; the counts, logged."""
        rows, budget = self.train_rows, renderer.budget
        self.train_rows, counts = fit_rows(renderer, rows)
        if not self.train_rows:
            raise ValueError(
                f"all {len(rows)} training rows are over context.max_prompt_tokens="
                f"{budget.max_prompt_tokens} (context.overlong={budget.overlong}); raise the limit"
            )
        if counts["dropped"] or counts["truncated"]:
            logger.warning(
                "context.max_prompt_tokens=%d: %d of %d training rows dropped, %d with a truncated reference "
                "solution (context.overlong=%s)",
                budget.max_prompt_tokens,
                counts["dropped"],
                len(rows),
                counts["truncated"],
                budget.overlong,
            )
        return counts

    def train_dataloader(self) -> DataLoader:
        rows = self._rows("train_rows")
        # Under DDP every rank takes its own shard of one seeded order (Lightning's sampler kwargs).
        shard = (getattr(self.trainer, "distributed_sampler_kwargs", None) or {}) if self.trainer else {}
        sampler = ResumableRandomSampler(
            rows,
            generator=torch.Generator().manual_seed(self.seed),
            num_replicas=shard.get("num_replicas", 1),
            rank=shard.get("rank", 0),
        )
        if self._resume is not None:  # a resumed run continues where the checkpoint left the data
            sampler.fast_forward(self._resume["epoch"], self._resume["batches"] * self.batch_size)
            self._resume = None
        return DataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=sampler.generator,  # as `shuffle=True, generator=...` did: the same order as before
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=collate_raw_text,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader()

    def _eval_dataloader(self) -> DataLoader:
        return DataLoader(
            self._rows("val_rows"),
            batch_size=self.eval_batch_size or self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_raw_text,
        )

    def _rows(self, attribute: str) -> Sequence[dict[str, str]]:
        rows = getattr(self, attribute)
        if rows is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are built")
        return rows


class ReasoningDataModule(RawTextDataModule):
    """Problems with privileged reference solutions, from local files or a Hugging Face hub dataset.

    Give exactly one of `path` (.jsonl/.json/.parquet/.csv files, all one format) or `name` (a hub id,
    with `subset` as its config name). `columns` maps our fields to source columns and is merged over the
    identity mapping; `answer: null` means the source has no answer. A source without an `answer` column
    gets "" unless `answer` was mapped to another column name, which must then exist. Local files hold
    one split, "train"; `split` and `val_split` may slice it (e.g. "train[:90%]").

    Validation comes from `val_split` when given, else `val_size` rows (an int count or a float fraction
    in (0, 1), 0 for none) are held out of `split` with a split seeded by `seed`. `max_train_samples` and
    `max_val_samples` cap each side after the split.

    A bad row has a null, empty or whitespace-only problem or solution. With `bad_rows="skip"` such rows
    are skipped, counted in `num_skipped_rows` and reported in one warning; with `bad_rows="raise"` the
    first one read raises a ValueError naming the source, split, row and field. Rows past a `max_*_samples`
    cap are not read, so they are neither counted nor raised on. A file that cannot be read is named in the
    error, with its line where the format has lines (jsonl, json, and csv encoding errors).
    """

    def __init__(
        self,
        path: str | list[str] | None = None,
        name: str | None = None,
        subset: str | None = None,
        split: str = "train",
        columns: Mapping[str, str | None] | None = None,
        val_split: str | None = None,
        val_size: int | float = 0.05,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        bad_rows: str = "skip",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed
        )
        if bad_rows not in BAD_ROW_POLICIES:
            raise ValueError(f"data.bad_rows must be one of {list(BAD_ROW_POLICIES)}, got {bad_rows!r}")
        if (path is None) == (name is None):
            raise ValueError(
                "ReasoningDataModule needs exactly one of `path` (local files) or `name` (a hub dataset id), "
                f"got path={path!r} and name={name!r}"
            )
        self.data_files, self.file_format = local_data_files(path) if path is not None else (None, None)
        self.name = name
        self.subset = subset
        self.split = split
        self.columns = merge_columns(columns)
        self.val_split = val_split
        self.val_size = _check_val_size(val_size)
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.bad_rows = bad_rows
        self.num_skipped_rows = 0

    @property
    def source(self) -> str:
        """The files or hub id the rows come from, for error messages."""
        if self.data_files is not None:
            return ", ".join(self.data_files)
        return self.name if self.subset is None else f"{self.name} (subset {self.subset})"

    def build_splits(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        train_source = self._load(self.split)
        train_columns = val_columns = self._resolve_columns(train_source)
        val_source: Dataset | None = None
        val_split = self.split
        # Maps a row's position in a part back to its row in the source split, for bad-row errors.
        train_position: Callable[[int], int] = _same_position
        val_position: Callable[[int], int] = _same_position
        if self.val_split is not None:
            val_source, val_split = self._load(self.val_split), self.val_split
            val_columns = self._resolve_columns(val_source)
        elif self.val_size:
            if isinstance(self.val_size, int) and self.val_size >= len(train_source):
                raise ValueError(
                    f"val_size={self.val_size} leaves no training rows: {self.source} split "
                    f"{self.split!r} has {len(train_source)} rows"
                )
            source_rows = len(train_source)
            parts = self._hold_out(train_source)
            train_source, val_source = parts["train"], parts["test"]
            train_position = partial(self._held_out_position, source_rows, "train")
            val_position = partial(self._held_out_position, source_rows, "test")

        train_rows, train_skipped = self._read_rows(
            train_source, train_columns, self.max_train_samples, self.split, train_position
        )
        val_rows, val_skipped = [], 0
        if val_source is not None:
            val_rows, val_skipped = self._read_rows(
                val_source, val_columns, self.max_val_samples, val_split, val_position
            )
        self.num_skipped_rows = train_skipped + val_skipped
        if self.num_skipped_rows:
            logger.warning(
                "Skipped %d rows of %s whose problem or solution is null, empty or whitespace-only "
                "(data.bad_rows=skip; set data.bad_rows=raise to stop at the first one)",
                self.num_skipped_rows,
                self.source,
            )
        if not train_rows:
            raise ValueError(f"{self.source} has no training rows with a non-empty problem and solution")
        return train_rows, val_rows

    def _hold_out(self, dataset: Dataset) -> dict[str, Dataset]:
        return dataset.train_test_split(test_size=self.val_size, seed=self.seed)

    def _held_out_position(self, source_rows: int, part: str, position: int) -> int:
        # train_test_split's order depends only on the row count, test_size and seed, so splitting the
        # row numbers the same way recovers where a row of a part sits in the source split.
        row_numbers = Dataset.from_dict({"row": list(range(source_rows))})
        return self._hold_out(row_numbers)[part][position]["row"]

    def _read_rows(
        self,
        dataset: Dataset,
        columns: Mapping[str, str | None],
        limit: int | None,
        split: str,
        position_in_split: Callable[[int], int],
    ) -> tuple[list[dict[str, str]], int]:
        try:
            return to_rows(dataset, columns, limit, stop_at_bad_row=self.bad_rows == "raise")
        except BadRowFound as bad:
            field = bad.defect.field
            column_note = "" if columns[field] == field else f" (column {columns[field]!r})"
            defect = "a null" if bad.defect.defect == "null" else "an empty or whitespace-only"
            raise ValueError(
                f"Row {position_in_split(bad.position)} (0-based) of {self.source}, split {split!r}, has "
                f"{defect} {field!r}{column_note}; fix the data, or set data.bad_rows=skip to skip and "
                "count such rows"
            ) from None
        except UnicodeDecodeError as err:
            # The JSON reader keeps invalid UTF-8 as it is; it only fails here, when values are decoded.
            raise self._read_error(split, err) from err

    def _load(self, split: str) -> Dataset:
        if self.data_files is None:
            return load_dataset(self.name, self.subset, split=split)
        try:
            return load_dataset(self.file_format, data_files=self.data_files, split=split)
        except Exception as err:
            raise self._read_error(split, err) from err

    def _read_error(self, split: str, err: Exception) -> ValueError:
        """The error for a source that failed to read, naming the file (and line) to blame when one is."""
        cause = describe_error(err)
        if self.data_files is None:
            return ValueError(f"Cannot read {self.source} (split {split!r}): {cause}")
        # The datasets error rarely says which of the files it could not parse, so look for it; this
        # runs only once reading has failed.
        try:
            culprit = find_bad_file(self.data_files, self.file_format)
        except Exception:  # a failing diagnosis must not hide the error it was diagnosing
            logger.debug("Could not find which of %s failed to read", self.source, exc_info=True)
            culprit = None
        if culprit is not None:
            return ValueError(f"Cannot read data file {culprit}")
        every_file_reads = " (each file reads on its own: do they share columns and types?)"
        return ValueError(
            f"Cannot read {self.source} as {self.file_format} (split {split!r}): {cause}"
            + (every_file_reads if len(self.data_files) > 1 else "")
        )

    def _resolve_columns(self, dataset: Dataset) -> dict[str, str | None]:
        return resolve_columns(
            self.columns, dataset.column_names, self.source, "data.columns", optional=OPTIONAL_FIELDS
        )


def _check_val_size(val_size: int | float) -> int | float:
    if isinstance(val_size, float) and not 0.0 <= val_size < 1.0:
        raise ValueError(f"A fractional val_size must be in [0, 1), got {val_size}")
    if isinstance(val_size, int) and val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    return val_size


def _same_position(position: int) -> int:
    return position
