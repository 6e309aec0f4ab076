"""The report's PNG plots, drawn with matplotlib on the file-only Agg backend."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from opsd_lightning.reporting.curves import (
    DIAGNOSTICS,
    DIAGNOSTICS_WINDOW,
    DIVERGENCE_QUARTERS,
    mean_curve,
    run_curve,
    step_means,
    window_mean,
)
from opsd_lightning.reporting.runs import Group, base_metrics


def _pyplot():  # noqa: ANN202 - the matplotlib.pyplot module
    """matplotlib.pyplot on the file-only Agg backend (imported late: the rest needs no matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    # 18 distinct colours: a sweep with more than 10 settings must not draw two of them alike.
    plt.rcParams["axes.prop_cycle"] = cycler(color=[*plt.cm.tab10.colors, *plt.cm.Dark2.colors])
    return plt


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
