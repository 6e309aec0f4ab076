"""`opsd-report <multirun dir>`: aggregate a Hydra multirun into a markdown table and PNG plots.

Jobs are grouped by their overrides without `seed=...`, so seeds of one setting are averaged
(mean ± std). Writes `report.md`, `accuracy_vs_tokens.png` and, when the jobs logged CSV,
`training_curves.png` into the multirun folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Group:
    """All seeds of one setting."""

    label: str
    metrics: list[dict] = field(default_factory=list)
    curves: list[list[dict[str, str]]] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)


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
        group.metrics.append(json.loads(metrics_file.read_text()))
        group.seeds.append(job_seed(metrics_file.parent))
        log = metrics_file.parent / "csv" / "metrics.csv"
        if log.is_file():
            with log.open() as handle:
                group.curves.append(list(csv.DictReader(handle)))
    return list(groups.values())


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def final_metric_names(groups: list[Group]) -> list[str]:
    names = {name for group in groups for m in group.metrics for name in m.get("final", {})}
    return sorted(names, key=lambda n: (not n.split("/")[-1].startswith("avg@"), n))


def markdown_table(groups: list[Group]) -> str:
    names = [
        n for n in final_metric_names(groups) if n.rsplit("/", 1)[-1].startswith(("avg@", "pass@", "maj@"))
    ]
    header = ["setting", "seeds", *names, "generated tokens", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # The base, evaluated before training (validate_before=true). Every setting of a sweep starts from
    # the same base for a given seed, with the same evaluation samples, so one setting's jobs hold it.
    base_runs = next(
        ([m["base"] for m in group.metrics] for group in groups if all(m.get("base") for m in group.metrics)),
        [],
    )
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


def plot_accuracy_vs_tokens(groups: list[Group], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ("train/loss", "train/completion_length")
    figure, axes = plt.subplots(1, len(columns), figsize=(11, 4))
    drawn = False
    for group in groups:
        for axis, column in zip(axes, columns, strict=True):
            by_step: dict[int, list[float]] = defaultdict(list)
            for rows in group.curves:
                for row in rows:
                    if row.get(column):
                        by_step[int(row["step"])].append(float(row[column]))
            if by_step:
                steps = sorted(by_step)
                axis.plot(steps, [statistics.fmean(by_step[s]) for s in steps], label=group.label)
                drawn = True
    for axis, column in zip(axes, columns, strict=True):
        axis.set_xlabel("optimizer step")
        axis.set_title(column)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    if drawn:
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return drawn


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
