"""Which data file failed to read, and where: the diagnosis behind a data module's read errors.

`datasets` rarely says which of several files it could not parse, nor on which line; these helpers run only
after a read has failed, to name the file (and the line, where the format has lines).
"""

from __future__ import annotations

import codecs
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError


def describe_error(err: BaseException) -> str:
    """`Type: message` of the error that says what went wrong, under datasets' generic wrapper."""
    while isinstance(err, DatasetGenerationError) and err.__cause__ is not None:
        err = err.__cause__
    message = str(err).strip()
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def find_bad_file(files: Sequence[str], file_format: str) -> str | None:
    """After a failed read: `<file>:<line>: <reason>` or `<file>: <reason>` for the first file to blame, or
    None when every file reads on its own (then the files disagree with each other, or the split is bad)."""
    # Text checks first: they point at a line and need not load (and cache) the good files.
    for file in files:
        problem = _text_problem(Path(file), file_format)
        if problem is not None:
            return problem
    for file in files:
        problem = _load_alone_problem(Path(file), file_format)
        if problem is not None:
            return problem
    return None


def _text_problem(path: Path, file_format: str) -> str | None:
    try:
        if file_format == "json":
            return _json_problem(path)
        if file_format == "csv":  # datasets reads csv as strict UTF-8
            return _utf8_lines_problem(path)
    except OSError as err:
        return f"{path}: {err.strerror or err}"
    return None


def _json_problem(path: Path) -> str | None:
    """The first line that is not UTF-8 or not one JSON object (JSON Lines), or for a file holding one JSON
    document (it starts with `[`, or is a .json file whose first line is not JSON by itself) json's line."""
    with path.open("rb") as stream:
        first_value_line = True
        for line_number, raw_line in enumerate(stream, start=1):
            if line_number == 1:
                raw_line = raw_line.removeprefix(codecs.BOM_UTF8)  # datasets drops a leading BOM too
            if not raw_line.strip():
                continue  # the JSON Lines reader skips blank lines
            try:
                # Without its newline, so json's column for a line cut short is where the line ends.
                text = raw_line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                return _utf8_problem(path, raw_line, err, line_number)
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                if first_value_line and (path.suffix.lower() == ".json" or text.lstrip().startswith("[")):
                    return _json_document_problem(path)
                return f"{path}:{line_number}: invalid JSON ({err.msg} at column {err.colno})"
            if first_value_line and text.lstrip().startswith("["):
                return _json_document_problem(path)  # datasets reads a file starting with `[` as one list
            if not isinstance(value, dict):
                return f"{path}:{line_number}: expected one JSON object per line, got {type(value).__name__}"
            first_value_line = False
    return None


def _json_document_problem(path: Path) -> str | None:
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return _utf8_problem(path, data, err)
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})"
    return None


def _utf8_lines_problem(path: Path) -> str | None:
    with path.open("rb") as stream:
        for line_number, raw_line in enumerate(stream, start=1):
            try:
                raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                return _utf8_problem(path, raw_line, err, line_number)
    return None


def _utf8_problem(path: Path, data: bytes, err: UnicodeDecodeError, first_line: int = 1) -> str:
    """`<file>:<line>: not valid UTF-8 ...` for a decode error in `data`, which starts at `first_line`."""
    line = first_line + data.count(b"\n", 0, err.start)
    column = err.start - data.rfind(b"\n", 0, err.start)  # 1-based, in bytes
    return (
        f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
        "re-save the file as UTF-8"
    )


def _load_alone_problem(path: Path, file_format: str) -> str | None:
    # A throwaway cache: the diagnosis should not leave Arrow copies of the files behind.
    with tempfile.TemporaryDirectory() as cache_dir:
        try:
            load_dataset(file_format, data_files=[str(path)], split="train", cache_dir=cache_dir)
        except Exception as err:
            return f"{path}: the file is empty" if _is_blank(path) else f"{path}: {describe_error(err)}"
    return None


def _is_blank(path: Path) -> bool:
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 16):
            if chunk.strip():
                return False
    return True
