"""Raw-text data modules: file formats, column mapping, splits, seeding, null rows and the Hydra config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
from datasets import Dataset
from hydra.utils import instantiate
from omegaconf import OmegaConf

from opsd_lightning.data import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    RawTextDataModule,
    ReasoningDataModule,
    collate_raw_text,
)
from opsd_lightning.data import datamodule as datamodule_module

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_DIR = Path(__file__).resolve().parents[3] / "shared" / "benchmarks"
FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    # Keep the Arrow caches that load_dataset writes out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))


def make_rows(count: int) -> list[dict[str, str]]:
    return [{"problem": f"p{i}", "solution": f"s{i}", "answer": f"a{i}"} for i in range(count)]


def write_rows(rows: list[dict], path: Path) -> Path:
    """Write rows in the format named by the file's extension."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        Dataset.from_list(rows).to_json(path)
    elif path.suffix == ".csv":
        Dataset.from_list(rows).to_csv(path, index=False)
    else:
        Dataset.from_list(rows).to_parquet(path)
    return path


def built(**kwargs) -> ReasoningDataModule:
    module = ReasoningDataModule(**kwargs)
    module.setup("fit")
    return module


def batches(loader) -> list[dict[str, list[str]]]:
    return list(loader)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_file_format_loads_in_order(tmp_path, suffix):
    rows = make_rows(12)
    module = built(path=str(write_rows(rows, tmp_path / f"data{suffix}")), val_size=0)
    assert module.train_rows == rows
    assert module.val_rows == []


def test_several_files_are_concatenated(tmp_path):
    first = write_rows(make_rows(3), tmp_path / "a.jsonl")
    second = write_rows(make_rows(5), tmp_path / "b.jsonl")
    assert len(built(path=[str(first), str(second)], val_size=0).train_rows) == 8


def test_columns_map_source_names_and_values_become_str(tmp_path):
    source = [{"question": f"q{i}", "reference": f"r{i}", "final": i} for i in range(4)]
    path = write_rows(source, tmp_path / "data.jsonl")
    module = built(
        path=str(path),
        columns={"problem": "question", "solution": "reference", "answer": "final"},
        val_size=0,
    )
    assert module.train_rows[1] == {"problem": "q1", "solution": "r1", "answer": "1"}


def test_partial_column_override_keeps_the_defaults(tmp_path):
    source = [{"question": "q", "solution": "s", "answer": "a"}] * 3
    module = built(
        path=str(write_rows(source, tmp_path / "data.jsonl")), columns={"problem": "question"}, val_size=0
    )
    assert module.train_rows[0] == {"problem": "q", "solution": "s", "answer": "a"}


def test_answer_is_optional_unless_mapped_to_a_named_column(tmp_path):
    no_answer = write_rows([{"problem": "p", "solution": "s"}] * 3, tmp_path / "no_answer.jsonl")
    assert built(path=str(no_answer), val_size=0).train_rows[0]["answer"] == ""

    with_answer = write_rows(make_rows(3), tmp_path / "with_answer.jsonl")
    assert built(path=str(with_answer), columns={"answer": None}, val_size=0).train_rows[0]["answer"] == ""

    with pytest.raises(ValueError, match="'final'"):
        built(path=str(no_answer), columns={"answer": "final"}, val_size=0)


def test_a_source_without_references_maps_solution_to_null(tmp_path):
    # For algorithm=ssopd: the teacher reads the group's own correct rollout, so no reference is needed.
    path = write_rows([{"problem": f"p{i}", "answer": str(i)} for i in range(3)], tmp_path / "no_refs.jsonl")
    rows = built(path=str(path), columns={"solution": None}, val_size=0).train_rows
    assert [(row["problem"], row["solution"], row["answer"]) for row in rows] == [
        ("p0", "", "0"),
        ("p1", "", "1"),
        ("p2", "", "2"),
    ]
    with pytest.raises(ValueError, match="columns.problem"):
        built(path=str(path), columns={"problem": None, "solution": None}, val_size=0)


def test_opsd_refuses_a_row_without_a_reference_and_names_the_way_out(tiny):
    from tests.conftest import opsd_module

    module = opsd_module(tiny)
    batch = {"problem": ["1 + 1?"], "solution": [""], "answer": ["2"]}
    with pytest.raises(ValueError, match="algorithm=ssopd"):
        module.micro_batch_loss(batch, 0)


def test_missing_required_column_names_file_field_and_available_columns(tmp_path):
    path = write_rows([{"question": "q", "reference": "r"}] * 3, tmp_path / "data.jsonl")
    with pytest.raises(ValueError) as info:
        built(path=str(path), columns={"problem": "question"})
    message = str(info.value)
    for expected in (str(path), "'solution'", "question", "reference"):
        assert expected in message


def test_unknown_column_field_is_rejected(tmp_path):
    path = write_rows(make_rows(3), tmp_path / "data.jsonl")
    with pytest.raises(ValueError, match="prompt"):
        ReasoningDataModule(path=str(path), columns={"prompt": "problem"})


@pytest.mark.parametrize("kwargs", [{}, {"path": "x.jsonl", "name": "org/data"}])
def test_exactly_one_of_path_or_name(kwargs):
    with pytest.raises(ValueError, match="path.*name"):
        ReasoningDataModule(**kwargs)


def test_bad_paths_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        ReasoningDataModule(path=str(tmp_path / "missing.jsonl"))

    unknown = tmp_path / "data.txt"
    unknown.write_text("hello")
    with pytest.raises(ValueError, match=r"data\.txt.*\.jsonl"):
        ReasoningDataModule(path=str(unknown))

    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"problem": "p", "solution": \n')
    with pytest.raises(ValueError, match="corrupt.jsonl"):
        built(path=str(corrupt))


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    """Write each line as given (str or raw bytes) followed by a newline."""
    path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
    return path


def good_json_line(index: int) -> str:
    return json.dumps({"problem": f"p{index}", "solution": f"s{index}"})


def read_error(path: str | list[str], **kwargs) -> str:
    """The message of the ValueError that loading `path` raises; the underlying error stays chained."""
    with pytest.raises(ValueError) as info:
        built(path=path, val_size=0, **kwargs)
    assert info.value.__cause__ is not None
    return str(info.value)


def test_truncated_jsonl_line_is_named_by_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "data.jsonl",
        [good_json_line(0), good_json_line(1), '{"problem": "p2", "solution": ', good_json_line(3)],
    )
    message = read_error(str(path))
    assert f"{path}:3: invalid JSON (Expecting value at column 31)" in message


def test_json_document_error_reports_json_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"problem": "p0", "solution": "s0"},\n  {"problem": "p1" "solution": "s1"}\n]\n')
    assert f"{path}:3: invalid JSON (Expecting ',' delimiter at column 20)" in read_error(str(path))


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [good_json_line(0), "[1, 2]"])
    assert f"{path}:2: expected one JSON object per line, got list" in read_error(str(path))


@pytest.mark.parametrize(
    ("suffix", "corrupt"),
    [
        (".jsonl", b'{"problem": "p", "solution": "s"}\n{oops\n'),
        (".csv", b"problem,solution\np,s\np,s,extra\n"),
        (".parquet", b"not a parquet file"),
    ],
)
def test_corrupt_second_file_is_named_and_not_the_first(tmp_path, suffix, corrupt):
    first = write_rows(make_rows(3), tmp_path / f"first{suffix}")
    second = tmp_path / f"second{suffix}"
    second.write_bytes(corrupt)
    message = read_error([str(first), str(second)])
    assert str(second) in message
    assert str(first) not in message


def test_corrupt_csv_names_the_file_and_the_reader_error(tmp_path):
    # datasets (pandas) rejects a row with more fields than the header, and says which line.
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("problem,solution\np0,s0\np1,s1,extra\n")
    reader_error = "ParserError: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3"
    assert f"{ragged}: {reader_error}" in read_error(str(ragged))
    # Binary junk is not UTF-8, which datasets requires of csv.
    junk = tmp_path / "junk.csv"
    junk.write_bytes(bytes(range(256)) * 4)
    assert f"{junk}:2: not valid UTF-8 (byte 0x80" in read_error(str(junk))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_file_that_is_not_utf8_is_named_by_line(tmp_path, suffix):
    # A jsonl loads but fails once its values are decoded; a csv fails to load: both name the line.
    if suffix == ".jsonl":
        lines = [good_json_line(0), b'{"problem": "caf\xe9", "solution": "s"}']
    else:
        lines = ["problem,solution", "p0,s0", b"caf\xe9,s1"]
    path = write_lines(tmp_path / f"latin1{suffix}", lines)
    line = len(lines)
    assert f"{path}:{line}: not valid UTF-8 (byte 0xe9 at column" in read_error(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_empty_file_is_named(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text("" if suffix != ".jsonl" else "\n\n")
    assert f"{path}: the file is empty" in read_error(str(path))


def bad_row_source(tmp_path: Path, field: str, value: str | None, at: int = 2, count: int = 6) -> Path:
    rows = make_rows(count)
    rows[at][field] = value
    return write_rows(rows, tmp_path / "data.jsonl")


def test_empty_and_whitespace_rows_are_skipped_and_counted(tmp_path, caplog):
    rows = make_rows(6)
    rows[1]["problem"] = ""
    rows[3]["solution"] = " \n\t "
    rows[4]["problem"] = None
    path = write_rows(rows, tmp_path / "data.jsonl")
    with caplog.at_level(logging.WARNING, logger=datamodule_module.__name__):
        module = built(path=str(path), val_size=0)
    assert module.num_skipped_rows == 3
    assert [row["problem"] for row in module.train_rows] == ["p0", "p2", "p5"]
    assert "Skipped 3 rows" in caplog.text
    assert str(path) in caplog.text


@pytest.mark.parametrize(
    ("field", "value", "defect"),
    [("problem", "", "an empty"), ("solution", " \t\n", "an empty"), ("problem", None, "a null")],
)
def test_bad_rows_raise_names_file_split_row_and_field(tmp_path, field, value, defect):
    path = bad_row_source(tmp_path, field, value)
    with pytest.raises(ValueError) as info:
        built(path=str(path), val_size=0, bad_rows="raise")
    message = str(info.value)
    for expected in (f"Row 2 (0-based) of {path}", "split 'train'", f"{defect}", f"'{field}'"):
        assert expected in message
    assert "data.bad_rows=skip" in message


def test_bad_rows_raise_names_the_mapped_column(tmp_path):
    rows = [{"question": f"q{i}", "solution": f"s{i}"} for i in range(4)]
    rows[1]["question"] = "   "
    path = write_rows(rows, tmp_path / "data.jsonl")
    with pytest.raises(ValueError, match=r"Row 1 .* 'problem' \(column 'question'\)"):
        built(path=str(path), columns={"problem": "question"}, val_size=0, bad_rows="raise")


def test_bad_rows_raise_gives_the_row_of_the_source_split_after_holding_out(tmp_path):
    path = bad_row_source(tmp_path, "solution", "", at=13, count=20)
    parts_seen = set()
    for seed in range(6):
        # Under skip the 10/10 split shows which part the bad row fell in.
        skipped = built(path=str(path), val_size=10, seed=seed)
        parts_seen.add("train" if len(skipped.train_rows) == 9 else "val")
        with pytest.raises(ValueError, match=r"Row 13 \(0-based\)"):
            built(path=str(path), val_size=10, seed=seed, bad_rows="raise")
    assert parts_seen == {"train", "val"}


def test_bad_rows_raise_leaves_good_data_alone(tmp_path):
    path = str(write_rows(make_rows(12), tmp_path / "data.jsonl"))
    strict, lenient = built(path=path, val_size=3, bad_rows="raise"), built(path=path, val_size=3)
    assert (strict.train_rows, strict.val_rows) == (lenient.train_rows, lenient.val_rows)


def test_invalid_bad_rows_policy_is_rejected(tmp_path):
    path = str(write_rows(make_rows(3), tmp_path / "data.jsonl"))
    with pytest.raises(ValueError, match=r"data\.bad_rows must be one of \['skip', 'raise'\], got 'drop'"):
        ReasoningDataModule(path=path, bad_rows="drop")


def test_config_default_bad_rows_matches_the_class():
    config = OmegaConf.load(REPO_ROOT / "conf" / "data" / "reasoning.yaml")
    assert config.bad_rows == "skip"


def test_validation_size_as_count_fraction_or_none(tmp_path):
    path = str(write_rows(make_rows(40), tmp_path / "data.jsonl"))
    by_count = built(path=path, val_size=7)
    assert (len(by_count.train_rows), len(by_count.val_rows)) == (33, 7)
    by_fraction = built(path=path, val_size=0.25)
    assert (len(by_fraction.train_rows), len(by_fraction.val_rows)) == (30, 10)
    # Held-out rows are not trained on.
    assert not {row["problem"] for row in by_fraction.val_rows} & {
        row["problem"] for row in by_fraction.train_rows
    }
    with pytest.raises(ValueError, match="val_size"):
        ReasoningDataModule(path=path, val_size=1.5)


def test_max_samples_truncate_after_the_split(tmp_path):
    path = str(write_rows(make_rows(40), tmp_path / "data.jsonl"))
    full = built(path=path, val_size=10)
    capped = built(path=path, val_size=10, max_train_samples=5, max_val_samples=3)
    assert capped.train_rows == full.train_rows[:5]
    assert capped.val_rows == full.val_rows[:3]


def test_seed_fixes_the_split_and_the_training_order(tmp_path):
    path = str(write_rows(make_rows(40), tmp_path / "data.jsonl"))
    first, same, other = (built(path=path, val_size=10, batch_size=4, seed=seed) for seed in (3, 3, 4))
    assert first.val_rows == same.val_rows
    assert batches(first.train_dataloader()) == batches(same.train_dataloader())
    assert first.val_rows != other.val_rows
    assert batches(first.train_dataloader()) != batches(other.train_dataloader())
    # Shuffled, not the stored order.
    assert [p for batch in batches(first.train_dataloader()) for p in batch["problem"]] != [
        row["problem"] for row in first.train_rows
    ]


def test_null_problems_and_solutions_are_skipped_and_counted(tmp_path, caplog):
    rows = make_rows(6)
    rows[1]["problem"] = None
    rows[4]["solution"] = None
    rows[5]["answer"] = None
    path = write_rows(rows, tmp_path / "data.jsonl")
    with caplog.at_level(logging.WARNING, logger=datamodule_module.__name__):
        module = built(path=str(path), val_size=0)
    assert module.num_skipped_rows == 2
    assert [row["problem"] for row in module.train_rows] == ["p0", "p2", "p3", "p5"]
    assert module.train_rows[-1]["answer"] == ""
    assert "Skipped 2 rows" in caplog.text


def test_batches_hold_exactly_three_lists_of_str(tmp_path):
    path = str(write_rows(make_rows(10), tmp_path / "data.parquet"))
    module = built(path=path, val_size=4, batch_size=4, eval_batch_size=3)
    train = batches(module.train_dataloader())
    assert [len(batch["problem"]) for batch in train] == [4, 2]
    val, test = batches(module.val_dataloader()), batches(module.test_dataloader())
    assert [len(batch["problem"]) for batch in val] == [3, 1]
    assert val == test
    assert [p for batch in val for p in batch["problem"]] == [row["problem"] for row in module.val_rows]
    for batch in train + val:
        assert set(batch) == set(FIELDS)
        assert all(isinstance(value, str) for field in FIELDS for value in batch[field])


def test_collate_fills_a_missing_answer():
    assert collate_raw_text([{"problem": "p", "solution": "s"}]) == {
        "problem": ["p"],
        "solution": ["s"],
        "answer": [""],
    }


def test_base_class_builds_once_and_needs_setup():
    class CountingDataModule(RawTextDataModule):
        calls = 0

        def build_splits(self):
            self.calls += 1
            return make_rows(5), make_rows(2)

    module = CountingDataModule(batch_size=2)
    with pytest.raises(RuntimeError, match="setup"):
        module.train_dataloader()
    module.setup("fit")
    module.setup("validate")
    assert module.calls == 1
    assert len(batches(module.train_dataloader())) == 3
    assert len(batches(module.val_dataloader())) == 1


def test_hub_dataset_uses_split_names(monkeypatch):
    calls = []

    def fake_load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return Dataset.from_list(make_rows(6 if split == "train" else 2))

    monkeypatch.setattr(datamodule_module, "load_dataset", fake_load_dataset)
    module = built(name="org/reasoning", subset="default", val_split="test")
    assert calls == [("org/reasoning", "default", "train"), ("org/reasoning", "default", "test")]
    assert (len(module.train_rows), len(module.val_rows)) == (6, 2)


def test_hydra_config_loads_the_benchmark_train_sample():
    sample = BENCHMARKS_DIR / "train_sample.jsonl"
    if not sample.is_file():
        pytest.skip(f"{sample} is not present")
    config = OmegaConf.create(
        {"seed": 0, "data": OmegaConf.load(REPO_ROOT / "conf" / "data" / "reasoning.yaml")}
    )
    config.data.path = str(sample)
    module = instantiate(config.data)
    module.setup("fit")
    assert module.num_skipped_rows == 0
    assert (len(module.train_rows), len(module.val_rows)) == (380, 20)
    rows = [*module.train_rows, *module.val_rows]
    assert all(row["problem"] and row["solution"] and row["answer"] for row in rows)
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == set(FIELDS)
    assert len(batch["problem"]) == 8


def test_setup_fits_the_training_rows_to_a_connected_renderers_budget_once(tiny, caplog):
    from opsd_lightning.contexts.renderer import ContextRenderer
    from opsd_lightning.data import ArithDataModule

    data = ArithDataModule(train_size=32, val_size=4, batch_size=2, seed=0)
    data.setup("fit")  # as opsd-train does before the model (and so the renderer) exists
    plain = ContextRenderer(tiny.tokenizer)
    lengths = sorted(len(plain.teacher_ids(r["problem"], r["solution"])) for r in data.train_rows)
    limit = lengths[len(lengths) // 2]  # half of the rows are over it
    data.connect(ContextRenderer(tiny.tokenizer, max_prompt_tokens=limit))
    with caplog.at_level("WARNING"):
        data.setup("fit")
        fitted = list(data.train_rows)
        data.setup("validate")  # Lightning sets up again for every stage: fitted once
    over = sum(length > limit for length in lengths)
    assert over > 0 and data.overlong_counts == {"dropped": 0, "truncated": over}
    assert data.train_rows == fitted and len(fitted) == 32
    assert all(len(plain.teacher_ids(r["problem"], r["solution"])) <= limit for r in fitted)
    assert caplog.text.count(f"{over} with a truncated reference solution") == 1

    unlimited = ArithDataModule(train_size=8, val_size=2)
    unlimited.connect(plain)
    unlimited.setup("fit")
    assert unlimited.overlong_counts is None and len(unlimited.train_rows) == 8

    too_small = ArithDataModule(train_size=8, val_size=2)
    too_small.connect(ContextRenderer(tiny.tokenizer, max_prompt_tokens=5, overlong="drop"))
    with pytest.raises(ValueError, match="all 8 training rows are over context.max_prompt_tokens=5"):
        too_small.setup("fit")


def test_benchmark_and_datamodule_share_the_column_rules():
    from opsd_lightning.data.sources import resolve_columns

    columns = {"problem": "question", "solution": "solution", "answer": "answer"}
    available = ["problem", "answer"]
    kept = resolve_columns(
        columns, available, "x.jsonl", "o", optional=("solution",), canonical_fallback=True
    )
    assert kept == {"problem": "problem", "solution": None, "answer": "answer"}
    with pytest.raises(
        ValueError, match=r"x.jsonl has no column 'question' for field 'problem'.*Set o.problem="
    ):
        resolve_columns(columns, available, "x.jsonl", "o", optional=("solution",))
    with pytest.raises(ValueError, match="'sol'"):  # optional only under its own name
        resolve_columns({"solution": "sol"}, available, "x.jsonl", "o", optional=("solution",))
