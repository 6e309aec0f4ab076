"""`opsd-report <multirun dir>`: aggregate a Hydra multirun into a markdown table and PNG plots.

Jobs are grouped by their overrides without `seed=...`, so seeds of one setting are averaged
(mean ± std). Writes `report.md`, `accuracy_vs_tokens.png` and, when the jobs logged CSV,
`training_curves.png`, `learning_curves.png` (held-out avg@k against generated tokens, from in-training
validation) and `diagnostics.png` (the `train/diag/*` distillation diagnostics) into the multirun folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from opsd_lightning.losses.diagnostics import QUARTER_DIAGNOSTIC_KEYS, SCALAR_DIAGNOSTIC_KEYS


@dataclass
class Group:
    """All seeds of one setting."""

    label: str
    metrics: list[dict] = field(default_factory=list)
    curves: list[list[dict[str, str]]] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    # One (metrics.json, CSV rows) pair per job; rows are [] when the job logged no CSV.
    runs: list[tuple[dict, list[dict[str, str]]]] = field(default_factory=list)


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


def all_overrides(job_dir: Path) -> list[str]:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    lines = overrides_file.read_text().splitlines() if overrides_file.is_file() else []
    return [line.lstrip("- ").strip() for line in lines if line.strip().startswith("-")]


def job_overrides(job_dir: Path) -> list[str]:
    """The job's command-line overrides, without the seed (seeds of one setting are averaged)."""
    return [o for o in all_overrides(job_dir) if not o.startswith(("seed=", "hydra.", "paths."))]


def job_seed(job_dir: Path) -> str:
    return next((o.split("=", 1)[1] for o in all_overrides(job_dir) if o.startswith("seed=")), "?")


def collect(multirun_dir: Path) -> list[Group]:
    """Every job folder holding a metrics.json, grouped by setting (in job order).

    A setting is labelled by the overrides that differ between jobs; those shared by all are dropped.
    """
    jobs = sorted(multirun_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name))
    if not jobs:
        raise FileNotFoundError(
            f"{multirun_dir} holds no */metrics.json: is it an opsd-train -m output folder?"
        )
    overrides = [job_overrides(job.parent) for job in jobs]
    shared = set.intersection(*(set(o) for o in overrides))
    groups: dict[str, Group] = {}
    for metrics_file, job_over in zip(jobs, overrides, strict=True):
        label = " ".join(o for o in job_over if o not in shared) or "default"
        group = groups.setdefault(label, Group(label))
        metrics = json.loads(metrics_file.read_text())
        group.metrics.append(metrics)
        group.seeds.append(job_seed(metrics_file.parent))
        log = metrics_file.parent / "csv" / "metrics.csv"
        rows: list[dict[str, str]] = []
        if log.is_file():
            with log.open() as handle:
                rows = list(csv.DictReader(handle))
            group.curves.append(rows)
        group.runs.append((metrics, rows))
    return list(groups.values())


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def final_metric_names(groups: list[Group]) -> list[str]:
    names = {name for group in groups for m in group.metrics for name in m.get("final", {})}
    return sorted(names, key=lambda n: (not n.split("/")[-1].startswith("avg@"), n))


def base_metrics(groups: list[Group]) -> list[dict[str, float]]:
    """The base's metrics (validate_before=true), one dict per seed; [] when no setting has them all.

    Every setting of a sweep starts from the same base for a given seed, with the same evaluation
    samples, so one setting's jobs hold it.
    """
    return next(
        ([m["base"] for m in group.metrics] for group in groups if all(m.get("base") for m in group.metrics)),
        [],
    )


def markdown_table(groups: list[Group]) -> str:
    names = [
        n for n in final_metric_names(groups) if n.rsplit("/", 1)[-1].startswith(("avg@", "pass@", "maj@"))
    ]
    header = ["setting", "seeds", *names, "generated tokens", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base_runs = base_metrics(groups)
    if base_runs:
        cells = ["base (before training)", str(len(base_runs))]
        for name in names:
            base_name = name.replace("test/", "val/", 1)
            values = [run[base_name] for run in base_runs if base_name in run]
            cells.append("{:.3f} ± {:.3f}".format(*mean_std(values)) if values else "—")
        lines.append("| " + " | ".join([*cells, "0", "—"]) + " |")
    for group in groups:
        cells = [group.label, str(len(group.metrics))]
        for name in names:
            values = [m["final"][name] for m in group.metrics if name in m.get("final", {})]
            cells.append("{:.3f} ± {:.3f}".format(*mean_std(values)) if values else "—")
        tokens = mean_std([float(m.get("generated_tokens", 0)) for m in group.metrics])
        wall = mean_std([float(m.get("wall_seconds", 0)) for m in group.metrics])
        cells += [f"{tokens[0]:,.0f}", f"{wall[0]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(groups: list[Group], metric: str) -> str:
    """One row per setting, one column per seed: paired comparisons when settings share seeds."""
    seeds = sorted({seed for group in groups for seed in group.seeds}, key=lambda x: (len(x), x))
    lines = ["| setting | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|" + "---|" * (len(seeds) + 1)]
    for group in groups:
        by_seed = {seed: m["final"].get(metric) for seed, m in zip(group.seeds, group.metrics, strict=True)}
        cells = [f"{by_seed[s]:.3f}" if by_seed.get(s) is not None else "—" for s in seeds]
        lines.append(f"| {group.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():  # noqa: ANN202 - the matplotlib.pyplot module
    """matplotlib.pyplot on the file-only Agg backend (imported late: the rest needs no matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    # 18 distinct colours: a sweep with more than 10 settings must not draw two of them alike.
    plt.rcParams["axes.prop_cycle"] = cycler(color=[*plt.cm.tab10.colors, *plt.cm.Dark2.colors])
    return plt


def step_means(curves: list[list[dict[str, str]]], column: str) -> dict[int, float]:
    """`column` per logged step, averaged over the runs (seeds) that logged it, in step order."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for rows in curves:
        for row in rows:
            if row.get(column):
                by_step[int(float(row["step"]))].append(float(row[column]))
    return {step: statistics.fmean(by_step[step]) for step in sorted(by_step)}


def plot_accuracy_vs_tokens(groups: list[Group], metric: str, path: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for group in groups:
        points = [
            (m.get("generated_tokens", 0), m["final"][metric]) for m in group.metrics if metric in m["final"]
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            axis.scatter(xs, ys, label=group.label, alpha=0.8)
    axis.set_xlabel("generated tokens (training)")
    axis.set_ylabel(metric)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_training_curves(groups: list[Group], path: Path) -> bool:
    """Loss and completion length over optimizer steps, mean over seeds; False if nothing was logged."""
    plt = _pyplot()
    columns = ("train/loss", "train/completion_length")
    figure, axes = plt.subplots(1, len(columns), figsize=(11, 4))
    drawn = False
    for group in groups:
        for axis, column in zip(axes, columns, strict=True):
            by_step = step_means(group.curves, column)
            if by_step:
                axis.plot(list(by_step), list(by_step.values()), label=group.label)
                drawn = True
    for axis, column in zip(axes, columns, strict=True):
        axis.set_xlabel("optimizer step")
        axis.set_title(column)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    if drawn:
        axes[0].legend(fontsize=7)
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return drawn


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


def plot_learning_curves(groups: list[Group], metric: str, path: Path) -> bool:
    """`metric` against cumulative generated tokens, one line per setting with a ± std band over seeds,
    and the base as a dashed line; False (nothing written) when no job validated during training."""
    curves = {group.label: [run_curve(m, rows, metric) for m, rows in group.runs] for group in groups}
    if not any(0 <= key < math.inf for runs in curves.values() for curve in runs for key in curve):
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, runs in curves.items():
        points = mean_curve(runs)
        xs = [p.tokens for p in points]
        (line,) = axis.plot(xs, [p.mean for p in points], marker="o", markersize=3, label=label)
        low, high = [p.mean - p.std for p in points], [p.mean + p.std for p in points]
        axis.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    base = [run[metric] for run in base_metrics(groups) if metric in run]
    if base:
        axis.axhline(statistics.fmean(base), color="gray", linestyle="--", label="base (mean over seeds)")
    axis.set_xlabel("cumulative generated tokens (training)")
    axis.set_ylabel(metric)
    axis.set_title("mean over seeds; band: ± 1 std over seeds", fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


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


def diagnostics_table(groups: list[Group], columns: list[str]) -> str:
    """Per setting, each diagnostic's mean over the last DIAGNOSTICS_WINDOW steps (then over seeds)."""
    header = ["setting", *(column.rsplit("/", 1)[-1] for column in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        values = [window_mean(group.curves, column) for column in columns]
        cells = [f"{value:.3f}" if value is not None else "—" for value in values]
        lines.append(f"| {group.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_diagnostics(groups: list[Group], columns: list[str], path: Path) -> None:
    """One panel per diagnostic over optimizer steps (mean over seeds), and divergence by position."""
    scalars = [column for column in DIAGNOSTICS if column in columns]
    quarters = [column for column in DIVERGENCE_QUARTERS if column in columns]
    panels = len(scalars) + bool(quarters)
    plt = _pyplot()
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    flat = list(axes.flat)
    for axis, column in zip(flat, scalars, strict=False):
        for group in groups:
            by_step = step_means(group.curves, column)
            axis.plot(list(by_step), list(by_step.values()), label=group.label)
        axis.set_title(column.rsplit("/", 1)[-1], fontsize=9)
        axis.set_xlabel("optimizer step")
    if quarters:
        _plot_divergence_by_position(flat[len(scalars)], groups, quarters)
    for axis in flat[panels:]:
        axis.set_visible(False)
    for axis in flat[:panels]:
        axis.grid(alpha=0.3)
    flat[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_divergence_by_position(axis, groups: list[Group], quarters: list[str]) -> None:  # noqa: ANN001
    """Grouped bars: per completion quarter, each setting's divergence over the final window."""
    width = 0.8 / len(groups)
    for index, group in enumerate(groups):
        heights = [window_mean(group.curves, column) or 0.0 for column in quarters]
        positions = [q + (index - (len(groups) - 1) / 2) * width for q in range(len(quarters))]
        axis.bar(positions, heights, width=width, label=group.label)
    axis.set_xticks(range(len(quarters)), [column.rsplit("_", 1)[-1] for column in quarters])
    axis.set_xlabel("completion quarter (q1 first .. q4 last)")
    axis.set_title(f"divergence by position (last {DIAGNOSTICS_WINDOW} steps)", fontsize=9)


def write_report(multirun_dir: Path) -> Path:
    """Write report.md and the plots into `multirun_dir`; return the report's path."""
    groups = collect(multirun_dir)
    parts = [
        f"# Report: {multirun_dir}",
        "",
        "Final metrics (test pass after training), mean ± std over seeds.",
        "",
    ]
    parts.append(markdown_table(groups))
    names = final_metric_names(groups)
    if names and any(len(group.metrics) > 1 for group in groups):
        parts += ["", f"{names[0]} per seed:", "", per_seed_table(groups, names[0])]
    if names:
        plot_accuracy_vs_tokens(groups, names[0], multirun_dir / "accuracy_vs_tokens.png")
        parts += ["", f"![{names[0]} vs generated tokens](accuracy_vs_tokens.png)"]
    if plot_training_curves(groups, multirun_dir / "training_curves.png"):
        parts += ["", "![training curves](training_curves.png)"]
    metric = learning_curve_metric(groups)
    if metric and plot_learning_curves(groups, metric, multirun_dir / "learning_curves.png"):
        parts += [
            "",
            f"Learning curves: {metric} at each validation against cumulative generated tokens, mean over "
            "seeds with a ± 1 std band; dashed: the base before training.",
            "",
            f"![{metric} vs generated tokens](learning_curves.png)",
        ]
    columns = diagnostic_columns(groups)
    if columns:
        plot_diagnostics(groups, columns, multirun_dir / "diagnostics.png")
        parts += [
            "",
            f"Distillation diagnostics: each run's mean over its last {DIAGNOSTICS_WINDOW} logged steps, "
            "then the mean over seeds.",
            "",
            diagnostics_table(groups, columns),
            "",
            "![distillation diagnostics](diagnostics.png)",
        ]
    report = multirun_dir / "report.md"
    report.write_text("\n".join(parts) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opsd-report", description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", type=Path, help="an opsd-train -m output folder")
    args = parser.parse_args(argv)
    report = write_report(args.multirun_dir)
    print(report.read_text())
    print(f"Written: {report}")


if __name__ == "__main__":
    main()
