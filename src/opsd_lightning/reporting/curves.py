"""Curves from the jobs' training CSVs: per-step means, learning curves against generated tokens, and the
distillation diagnostics over each run's final steps."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from opsd_lightning.objectives.diagnostics import QUARTER_DIAGNOSTIC_KEYS, SCALAR_DIAGNOSTIC_KEYS
from opsd_lightning.reporting.runs import Group, mean_std


@dataclass(frozen=True)
class CurvePoint:
    """One point of a setting's learning curve: the mean over seeds, and the spread of y."""

    tokens: float  # mean cumulative generated tokens over seeds
    mean: float
    std: float  # sample std over seeds (0 for one seed)
    low: float  # min over seeds
    high: float  # max over seeds
    seeds: int


TOKENS_COLUMN = "train/generated_tokens_total"
# The distillation diagnostics as the training CSV names them (the module logs stats as `train/<key>`).
DIAGNOSTICS = tuple(f"train/{key}" for key in SCALAR_DIAGNOSTIC_KEYS)
DIVERGENCE_QUARTERS = tuple(f"train/{key}" for key in QUARTER_DIAGNOSTIC_KEYS)
DIAGNOSTICS_WINDOW = 10  # the table's diagnostics are means over each run's last this-many logged steps


def step_means(curves: list[list[dict[str, str]]], column: str) -> dict[int, float]:
    """`column` per logged step, averaged over the runs (seeds) that logged it, in step order."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for rows in curves:
        for row in rows:
            if row.get(column):
                by_step[int(float(row["step"]))].append(float(row[column]))
    return {step: statistics.fmean(by_step[step]) for step in sorted(by_step)}


def learning_curve_metric(groups: list[Group]) -> str | None:
    """The avg@k validated during training (`val/heldout/avg@4` first), None if none was."""
    logged = {
        name for group in groups for rows in group.curves for row in rows for name, v in row.items() if v
    }
    names = [n for n in logged if n.startswith("val/") and n.rsplit("/", 1)[-1].startswith("avg@")]
    names.sort(key=lambda name: ("/heldout/" not in name, name))  # held-out first, then by name
    return names[0] if names else None


def run_curve(metrics: dict, rows: list[dict[str, str]], metric: str) -> dict[float, tuple[float, float]]:
    """One job's learning curve, keyed by when it was measured: {key: (generated tokens, metric)}.

    Key -1 is the base (metrics.json `base`, or a validation row logged before any training row) at 0
    tokens. An in-training validation is keyed by its logged step and joined to the generated-token total
    of the last training row before it (the CSV keeps the logging order). The final test is keyed +inf,
    unless it repeats the last validation (same model, same seeded samples: the same point).
    """
    points: dict[float, tuple[float, float]] = {}
    base = (metrics.get("base") or {}).get(metric)
    if base is not None:
        points[-1.0] = (0.0, float(base))
    tokens: float | None = None
    for row in rows:
        if row.get(TOKENS_COLUMN):
            tokens = float(row[TOKENS_COLUMN])
        if row.get(metric):
            key = -1.0 if tokens is None else float(row["step"])
            points[key] = (tokens or 0.0, float(row[metric]))
    final = (metrics.get("final") or {}).get(metric.replace("val/", "test/", 1))
    if final is not None:
        final_point = (float(metrics.get("generated_tokens", 0)), float(final))
        last = points[max(points)] if points else None
        if last is None or last[0] != final_point[0] or not math.isclose(last[1], final_point[1]):
            points[math.inf] = final_point
    return points


def mean_curve(curves: list[dict[float, tuple[float, float]]]) -> list[CurvePoint]:
    """Seeds averaged key by key: x = mean generated tokens; y = mean metric, its std, min and max."""
    points = []
    for key in sorted({key for curve in curves for key in curve}):
        pairs = [curve[key] for curve in curves if key in curve]
        ys = [y for _, y in pairs]
        mean, std = mean_std(ys)
        tokens = statistics.fmean(x for x, _ in pairs)
        points.append(CurvePoint(tokens, mean, std, min(ys), max(ys), len(pairs)))
    return points


def diagnostic_columns(groups: list[Group]) -> list[str]:
    """The `train/diag/*` columns that hold a value in some job's CSV, in DIAGNOSTICS order."""
    logged = {
        name for group in groups for rows in group.curves for row in rows for name, v in row.items() if v
    }
    return [column for column in (*DIAGNOSTICS, *DIVERGENCE_QUARTERS) if column in logged]


def window_mean(
    curves: list[list[dict[str, str]]], column: str, window: int = DIAGNOSTICS_WINDOW
) -> float | None:
    """Each run's mean of its last `window` logged values of `column`, averaged over runs.

    None when no run logged `column`.
    """
    per_run = []
    for rows in curves:
        values = [float(row[column]) for row in rows if row.get(column)]
        if values:
            per_run.append(statistics.fmean(values[-window:]))
    return statistics.fmean(per_run) if per_run else None
