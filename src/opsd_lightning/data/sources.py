"""Where raw-text rows come from: local data files, the column mapping, and reading rows with bad-row checks.

Every row has our fields, str `problem`, `solution` and `answer`, read from the source's columns; a row whose
problem or solution is null, empty or whitespace-only is bad.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from datasets import Dataset

REQUIRED_FIELDS = ("problem", "solution")
OPTIONAL_FIELDS = ("answer",)

_DEFAULT_COLUMNS: dict[str, str | None] = {field: field for field in REQUIRED_FIELDS + OPTIONAL_FIELDS}
_FORMAT_BY_SUFFIX = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Rows are read from Arrow in blocks so a `max_*_samples` cap stops early on a large hub dataset.
_READ_BLOCK_ROWS = 1024


def resolve_columns(
    columns: Mapping[str, str | None],
    available: Sequence[str],
    source: str,
    option: str,
    optional: Collection[str] = (),
    canonical_fallback: bool = False,
) -> dict[str, str | None]:
    """Our field -> the source column it is read from; a field mapped to None is not read.

    A column the source lacks raises a ValueError naming the source, the available columns and the option
    to set (`<option>.<field>`), except: with `canonical_fallback` (a local copy in our own layout), a
    column named like the field is read instead; and an `optional` field left at its own name is None.
    """
    resolved: dict[str, str | None] = {}
    for field, column in columns.items():
        if column is not None and column not in available:
            if canonical_fallback and field in available:
                column = field
            elif field in optional and column == field:
                column = None
            else:
                raise ValueError(
                    f"{source} has no column {column!r} for field {field!r}; available columns: "
                    f"{list(available)}. Set {option}.{field}=<column>."
                )
        resolved[field] = column
    return resolved


def local_data_files(path: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], str]:
    """Check that every file exists and that all share one supported format; return (files, format)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise ValueError("`path` is an empty list; give at least one data file")
    files, formats = [], set()
    for entry in paths:
        file = Path(entry).expanduser()
        file_format = _FORMAT_BY_SUFFIX.get(file.suffix.lower())
        if file_format is None:
            raise ValueError(
                f"Cannot infer the format of {file}: supported extensions are {sorted(_FORMAT_BY_SUFFIX)}"
            )
        if not file.is_file():
            raise FileNotFoundError(f"Data file not found: {file}")
        files.append(str(file))
        formats.add(file_format)
    if len(formats) > 1:
        raise ValueError(f"All data files must share one format, got {sorted(formats)} for {files}")
    return files, formats.pop()


def merge_columns(columns: Mapping[str, str | None] | None) -> dict[str, str | None]:
    """`columns` merged over the identity mapping of our fields; an unknown field or a null problem raises."""
    overrides = dict(columns or {})
    unknown = sorted(set(overrides) - set(_DEFAULT_COLUMNS))
    if unknown:
        raise ValueError(f"Unknown fields {unknown} in `columns`; the fields are {list(_DEFAULT_COLUMNS)}")
    merged = {**_DEFAULT_COLUMNS, **overrides}
    if merged["problem"] is None:
        raise ValueError("`columns.problem` cannot be null: every row needs a problem")
    # `solution: null`: a source without reference solutions (every row gets ""), for algorithms that need
    # none (algorithm=ssopd); OPSD's reference context refuses such rows when it meets them.
    return merged


class RowDefect(NamedTuple):
    """Why a row is bad: its `field` (problem or solution) is "null" or "empty" (incl. whitespace-only)."""

    field: str
    defect: str


class BadRowFound(Exception):
    """Raised by `to_rows` when asked to stop at a bad row; `position` is the row's index in its dataset."""

    def __init__(self, position: int, defect: RowDefect) -> None:
        super().__init__(position, defect)
        self.position, self.defect = position, defect


def _row_defect(values: Mapping[str, object], columns: Mapping[str, str | None]) -> RowDefect | None:
    for field in REQUIRED_FIELDS:
        if columns[field] is None:  # not read from this source (no reference solutions)
            continue
        if values[field] is None:
            return RowDefect(field, "null")
        if not str(values[field]).strip():
            return RowDefect(field, "empty")
    return None


def _iter_rows(dataset: Dataset, columns: Mapping[str, str | None]) -> Iterator[dict[str, str] | RowDefect]:
    """Yield each source row with our fields as str, or the defect of a row with a bad problem/solution."""
    used = list(dict.fromkeys(column for column in columns.values() if column is not None))
    for block in dataset.select_columns(used).iter(batch_size=_READ_BLOCK_ROWS):
        for index in range(len(block[used[0]])):
            values = {
                field: None if column is None else block[column][index] for field, column in columns.items()
            }
            defect = _row_defect(values, columns)
            if defect is not None:
                yield defect
            else:
                yield {field: "" if value is None else str(value) for field, value in values.items()}


def to_rows(
    dataset: Dataset, columns: Mapping[str, str | None], limit: int | None, stop_at_bad_row: bool = False
) -> tuple[list[dict[str, str]], int]:
    """Up to `limit` usable rows of `dataset`, and how many bad rows were skipped on the way; with
    `stop_at_bad_row`, the first bad row raises `BadRowFound` instead."""
    rows: list[dict[str, str]] = []
    skipped = 0
    for position, row in enumerate(_iter_rows(dataset, columns)):
        if limit is not None and len(rows) >= limit:
            break
        if isinstance(row, RowDefect):
            if stop_at_bad_row:
                raise BadRowFound(position, row)
            skipped += 1
        else:
            rows.append(row)
    return rows, skipped
