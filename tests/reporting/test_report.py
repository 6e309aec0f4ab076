"""opsd-report on a hand-built multirun folder: seeds averaged per setting, plots written."""

from __future__ import annotations

import json
import math

import pytest

from opsd_lightning.cli.report import main, write_report
from opsd_lightning.reporting.curves import (
    DIAGNOSTICS,
    DIVERGENCE_QUARTERS,
    mean_curve,
    run_curve,
    window_mean,
)


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


def write_job(root, number, overrides, metrics, rows):
    """A job folder from a metrics.json dict and CSV rows (dicts; the columns are their union)."""
    job = root / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "metrics.json").write_text(json.dumps(metrics))
    (job / "csv").mkdir()
    columns = list(dict.fromkeys(name for row in rows for name in row))
    lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
    (job / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


VAL = "val/heldout/avg@4"


def validated_run(base, values, tokens_per_step, final):
    """metrics.json and CSV rows of a 20-step run validated before training and after steps 10 and 20.

    Logged as Lightning does (seen in a real run): the base validation first at step 0, then one
    training row per optimizer step (steps 0..19), each validation after the training row it follows,
    with the same step.
    """
    rows = [{"step": 0, VAL: base}]
    for step in range(20):
        rows.append({"step": step, "train/loss": 0.5, TOKENS: tokens_per_step * (step + 1)})
        if step + 1 in (10, 20):
            rows.append({"step": step, VAL: values[(step + 1) // 10 - 1]})
    tokens = 20 * tokens_per_step
    metrics = {"base": {VAL: base}, "final": {"test/heldout/avg@4": final}, "generated_tokens": tokens}
    return metrics, rows


TOKENS = "train/generated_tokens_total"


def test_run_curve_joins_each_validation_to_the_tokens_generated_by_then():
    metrics, rows = validated_run(0.3, [0.4, 0.5], tokens_per_step=100, final=0.55)
    assert run_curve(metrics, rows, VAL) == {
        -1.0: (0.0, 0.3),  # the base: before training, 0 tokens
        9.0: (1000.0, 0.4),  # after 10 steps of 100 tokens
        19.0: (2000.0, 0.5),
        math.inf: (2000.0, 0.55),  # the final test differs from the last validation: kept
    }
    # A final test that repeats the last validation (the same model and samples) is the same point.
    metrics["final"]["test/heldout/avg@4"] = 0.5
    assert math.inf not in run_curve(metrics, rows, VAL)


def test_mean_curve_averages_seeds_point_by_point_with_std_and_range():
    seed0 = run_curve(*validated_run(0.3, [0.4, 0.5], tokens_per_step=100, final=0.5), VAL)
    seed1 = run_curve(*validated_run(0.5, [0.6, 0.9], tokens_per_step=300, final=0.9), VAL)
    points = mean_curve([seed0, seed1])
    assert [p.tokens for p in points] == [0.0, 2000.0, 4000.0]  # (1000+3000)/2, (2000+6000)/2
    assert [p.mean for p in points] == pytest.approx([0.4, 0.5, 0.7])
    # Sample std of two values a, b is |a-b|/sqrt(2).
    assert [p.std for p in points] == pytest.approx([0.2 / 2**0.5, 0.2 / 2**0.5, 0.4 / 2**0.5])
    assert [(p.low, p.high, p.seeds) for p in points] == [(0.3, 0.5, 2), (0.4, 0.6, 2), (0.5, 0.9, 2)]
    # A seed that stopped early counts only where it has a point.
    shorter = {key: value for key, value in seed1.items() if key < 19}
    assert [p.seeds for p in mean_curve([seed0, shorter])] == [2, 2, 1]


def diag_rows(steps, offset):
    """Training rows with every diagnostic: value = offset + step (q_i: offset + step + i)."""
    rows = []
    for step in range(steps):
        row = {"step": step, TOKENS: 10 * (step + 1)} | {column: offset + step for column in DIAGNOSTICS}
        rows.append(row | {column: offset + step + i for i, column in enumerate(DIVERGENCE_QUARTERS, 1)})
    return rows


def test_learning_curves_and_diagnostics_are_plotted_and_tabulated(tmp_path):
    for number, (setting, seed, offset) in enumerate([("opsd", 0, 0.0), ("opsd", 1, 2.0), ("sft", 0, 1.0)]):
        metrics, rows = validated_run(0.3 + seed / 10, [0.4, 0.5], tokens_per_step=100, final=0.5)
        write_job(
            tmp_path, number, [f"algorithm={setting}", f"seed={seed}"], metrics, rows + diag_rows(20, offset)
        )
    report = write_report(tmp_path).read_text()
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    assert (tmp_path / "diagnostics.png").stat().st_size > 1000
    assert "![val/heldout/avg@4 vs generated tokens](learning_curves.png)" in report
    assert "![distillation diagnostics](diagnostics.png)" in report
    header = "| setting | teacher_entropy | student_entropy | top1_agreement | teacher_mass_on_student_topk"
    assert (
        header + " | clip_fraction | divergence_q1 | divergence_q2 | divergence_q3 | divergence_q4 |"
        in report
    )
    # Last 10 of steps 0..19 have mean 14.5; opsd averages offsets 0 and 2 (15.5), sft has offset 1.
    assert (
        "| algorithm=opsd | " + " | ".join(["15.500"] * 5 + ["16.500", "17.500", "18.500", "19.500"])
        in report
    )
    assert (
        "| algorithm=sft | " + " | ".join(["15.500"] * 5 + ["16.500", "17.500", "18.500", "19.500"]) in report
    )


def test_window_mean_averages_each_runs_last_steps_then_the_runs():
    # Run 1 logs 0..11 (last 10: 2..11, mean 6.5); run 2 logs three values (mean 2), an empty cell is skipped.
    run1 = [{"step": s, "x": s} for s in range(12)]
    run2 = [{"step": 0, "x": 1}, {"step": 1, "x": ""}, {"step": 2, "x": 2}, {"step": 3, "x": 3}]
    curves = [[{k: str(v) for k, v in row.items()} for row in rows] for rows in (run1, run2)]
    assert window_mean(curves, "x") == pytest.approx((6.5 + 2.0) / 2)
    assert window_mean(curves, "y") is None


def test_nothing_is_written_without_validation_or_diagnostics(tmp_path):
    make_job(tmp_path, 0, ["algorithm=opsd", "seed=0"], 0.5, 1000, [0.3, 0.2], base=0.3)
    make_job(tmp_path, 1, ["algorithm=sft", "seed=0"], 0.6, 0, [1.0, 0.9], base=0.3)
    report = write_report(tmp_path).read_text()
    assert not (tmp_path / "learning_curves.png").exists()
    assert not (tmp_path / "diagnostics.png").exists()
    assert "learning_curves" not in report and "diagnostics" not in report


def test_only_the_logged_diagnostics_get_panels_and_columns(tmp_path):
    rows = [{"step": s, TOKENS: 10 * (s + 1), "train/diag/top1_agreement": 0.5} for s in range(3)]
    write_job(tmp_path, 0, ["algorithm=opsd", "seed=0"], {"final": {}, "generated_tokens": 30}, rows)
    report = write_report(tmp_path).read_text()
    assert "| setting | top1_agreement |" in report and "| default | 0.500 |" in report
    assert (tmp_path / "diagnostics.png").stat().st_size > 1000
    assert not (tmp_path / "learning_curves.png").exists()
