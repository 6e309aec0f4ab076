"""The tool metrics of a tool_use multirun, beside opsd-report's accuracy tables: writes `tool_report.md`
(base and each setting: accuracy, tool calls, call validity, tool errors, turns, lengths; per seed) and
`tool_curves.png` (held-out episodes at each validation, and the multi-turn sampler's train/ metrics).

Usage: python experiments/tool_use/tool_report.py <multirun folder>   (run.sh calls it after opsd-report)

Everything is read from the jobs' metrics.json and CSV logs (opsd_lightning.reporting.runs.collect): a metric
that was not logged shows as "—" and its panel stays empty.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from opsd_lightning.reporting.curves import step_means
from opsd_lightning.reporting.runs import Group, base_metrics, collect, mean_std

BENCH = "heldout"
# (column label, metric suffix under val/<bench>/ or test/<bench>/); validity is derived from tool_error_rate.
# avg@n and pass@n follow evaluation.num_samples (4 in the experiment).
EVAL_COLUMNS = (
    ("avg@n", "avg@n"),
    ("pass@n", "pass@n"),
    ("tool calls / episode", "tool_calls"),
    ("call validity", "validity"),
    ("tool error rate", "tool_error_rate"),
    ("turns", "turns"),
    ("completion tokens (model + tool)", "completion_length"),
    ("truncation rate", "truncation_rate"),
    ("format rate", "format_rate"),
)
# Panels of tool_curves.png: (title, CSV column); val/ columns are drawn at their validation steps, step 0
# being the base (metrics.json `base`).
PANELS = (
    ("held-out avg@n", f"val/{BENCH}/avg@n"),
    ("held-out tool error rate", f"val/{BENCH}/tool_error_rate"),
    ("held-out tool calls / episode", f"val/{BENCH}/tool_calls"),
    ("train: tool calls / episode", "train/tool_calls"),
    ("train: tool errors / episode", "train/tool_errors"),
    ("train: turns / episode", "train/turns"),
    ("train: completion tokens", "train/completion_length"),
    ("train: truncation rate", "train/truncation_rate"),
    ("train: reward (GRPO's groups only)", "train/reward"),
)


def num_samples(groups: list[Group]) -> int:
    """n of avg@n: evaluation.num_samples, read back from the logged metric names."""
    for group in groups:
        for m in group.metrics:
            for name in (*m.get("final", {}), *(m.get("base") or {})):
                if name.startswith(("test/", "val/")) and name.rsplit("/", 1)[-1].startswith("avg@"):
                    return int(name.rsplit("@", 1)[-1])
    raise ValueError("no avg@n metric in the jobs' metrics.json: was the held-out benchmark evaluated?")


def metric(values: dict, stage: str, suffix: str) -> float | None:
    """One evaluation metric of a metrics.json section (`val` for the base, `test` after training)."""
    if suffix == "validity":  # the share of calls that parsed and ran: 1 - tool_error_rate
        error = values.get(f"{stage}/{BENCH}/tool_error_rate")
        return None if error is None or math.isnan(error) else 1.0 - error
    value = values.get(f"{stage}/{BENCH}/{suffix}")
    return None if value is None else float(value)


def cell(values: list[float | None], digits: int = 3) -> str:
    """Mean ± std over the seeds that have a value ("—" if none: e.g. an error rate with no calls)."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return "—"
    mean, std = mean_std(present)
    return f"{mean:,.{digits}f} ± {std:,.{digits}f}" if len(present) > 1 else f"{mean:,.{digits}f}"


def rows_of(groups: list[Group]) -> list[tuple[str, list[str], list[dict], str]]:
    """(label, seeds, per-seed metric dicts, stage) for the base and every setting."""
    rows = []
    base = base_metrics(groups)
    if base:
        owner = next(g for g in groups if all(m.get("base") for m in g.metrics))
        rows.append(("base (no training)", owner.seeds, base, "val"))
    rows += [(g.label, g.seeds, [m.get("final", {}) for m in g.metrics], "test") for g in groups]
    return rows


def tool_tables(groups: list[Group], n: int) -> str:
    rows = rows_of(groups)
    columns = [
        (label.replace("@n", f"@{n}"), suffix.replace("@n", f"@{n}")) for label, suffix in EVAL_COLUMNS
    ]
    header = ["setting", "seeds", *(label for label, _ in columns), "generated tokens (training)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tokens = {g.label: [float(m.get("generated_tokens", 0)) for m in g.metrics] for g in groups}
    for label, seeds, values, stage in rows:
        cells = [cell([metric(v, stage, suffix) for v in values]) for _, suffix in columns]
        spent = cell(tokens[label], digits=0) if label in tokens else "0"
        lines.append("| " + " | ".join([label, str(len(seeds)), *cells, spent]) + " |")
    out = ["Held-out episodes, mean ± std over seeds:", "", *lines]
    for title, suffix in (
        (f"avg@{n}", f"avg@{n}"),
        ("tool error rate", "tool_error_rate"),
        ("turns", "turns"),
    ):
        seed_names = sorted({s for _, seeds, _, _ in rows for s in seeds}, key=lambda s: (len(s), s))
        out += ["", f"{title} per seed:", ""]
        out += ["| setting | " + " | ".join(f"seed {s}" for s in seed_names) + " |"]
        out += ["|" + "---|" * (len(seed_names) + 1)]
        for label, seeds, values, stage in rows:
            by_seed = dict(zip(seeds, values, strict=True))
            got = [metric(by_seed[s], stage, suffix) if s in by_seed else None for s in seed_names]
            shown = ("—" if v is None or math.isnan(v) else f"{v:.3f}" for v in got)
            out.append(f"| {label} | " + " | ".join(shown) + " |")
    return "\n".join(out)


def plot_tool_curves(groups: list[Group], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 3, figsize=(13, 10))
    base_runs = base_metrics(groups)  # the same base for every setting of a seed: its point at step 0
    for axis, (title, column) in zip(axes.flat, PANELS, strict=True):
        title, column = title.replace("@n", f"@{n}"), column.replace("@n", f"@{n}")
        for index, group in enumerate(groups):
            means = step_means(group.curves, column)
            base = [b[column] for b in base_runs if column in b and not math.isnan(b[column])]
            if column.startswith("val/") and base:
                means = {0: sum(base) / len(base), **means}
            final = [m["final"].get(column.replace("val/", "test/", 1)) for m in group.metrics]
            final = [v for v in final if v is not None and not math.isnan(v)]
            if column.startswith("val/") and final:  # the test after training, at its last step
                steps = max(int(m.get("optimizer_steps", 0)) for m in group.metrics)
                means = {**means, steps: sum(final) / len(final)}
            if means:
                axis.plot(
                    list(means),
                    list(means.values()),
                    marker="o" if column.startswith("val/") else "",
                    label=group.label,
                    color=f"C{index}",
                )
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(
        "tool_use: mean over seeds (held-out points: the base at step 0, the test after the last step)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the multirun folder (run.sh's output)")
    folder = parser.parse_args(argv).folder
    groups = collect(folder)
    n = num_samples(groups)
    report = folder / "tool_report.md"
    report.write_text(
        f"# Tool metrics: {folder}\n\n{tool_tables(groups, n)}\n\n![tool curves](tool_curves.png)\n"
    )
    plot_tool_curves(groups, n, folder / "tool_curves.png")
    print(f"wrote {report} and {folder / 'tool_curves.png'}")


if __name__ == "__main__":
    main()
