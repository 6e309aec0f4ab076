"""opsd-report on a hand-built multirun folder: seeds averaged per setting, plots written."""

from __future__ import annotations

import json

import pytest

from opsd_lightning.report import main, write_report


def make_job(root, number, overrides, accuracy, tokens, losses, base=None):
    job = root / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    final = {"test/heldout/avg@4": accuracy, "test/heldout/pass@4": min(1.0, accuracy + 0.2)}
    (job / "metrics.json").write_text(
        json.dumps(
            {"final": final, "generated_tokens": tokens, "wall_seconds": 10.0}
            | ({"base": {"val/heldout/avg@4": base}} if base is not None else {})
        )
    )
    (job / "csv").mkdir()
    rows = "".join(f"{step},{loss},40\n" for step, loss in enumerate(losses))
    (job / "csv" / "metrics.csv").write_text("step,train/loss,train/completion_length\n" + rows)


def test_report_averages_seeds_per_setting_and_writes_plots(tmp_path, capsys):
    make_job(tmp_path, 0, ["algorithm=opsd", "seed=0"], 0.5, 1000, [0.3, 0.2])
    make_job(tmp_path, 1, ["algorithm=opsd", "seed=1"], 0.7, 3000, [0.5, 0.4])
    make_job(tmp_path, 2, ["algorithm=sft", "seed=0"], 0.6, 0, [1.0, 0.9])
    make_job(tmp_path, 3, ["algorithm=sft", "seed=1"], 0.6, 0, [1.2, 1.1])
    main([str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    # opsd: mean 0.6, sample std of (0.5, 0.7) = 0.1414; sft: 0.6 ± 0
    assert "| algorithm=opsd | 2 | 0.600 ± 0.141 | 0.800 ± 0.141 | 2,000 | 10.0 |" in report
    assert "| algorithm=sft | 2 | 0.600 ± 0.000 | 0.800 ± 0.000 | 0 | 10.0 |" in report
    assert "| setting | seed 0 | seed 1 |" in report and "| algorithm=opsd | 0.500 | 0.700 |" in report
    assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    assert "Written:" in capsys.readouterr().out


def test_report_has_one_base_row_with_one_entry_per_seed(tmp_path):
    make_job(tmp_path, 0, ["algorithm=opsd", "seed=0"], 0.5, 1000, [0.3], base=0.3)
    make_job(tmp_path, 1, ["algorithm=opsd", "seed=1"], 0.5, 1000, [0.3], base=0.5)
    make_job(tmp_path, 2, ["algorithm=sft", "seed=0"], 0.6, 0, [1.0], base=0.3)
    make_job(tmp_path, 3, ["algorithm=sft", "seed=1"], 0.6, 0, [1.0], base=0.5)
    report = write_report(tmp_path).read_text()
    assert "| base (before training) | 2 | 0.400 ± 0.141 | — | 0 | — |" in report


def test_report_on_a_folder_without_runs_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        write_report(tmp_path)
