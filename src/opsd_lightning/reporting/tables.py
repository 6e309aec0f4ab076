"""The report's markdown tables: final metrics per setting, one metric per seed, and the diagnostics."""

from __future__ import annotations

from opsd_lightning.reporting.curves import window_mean
from opsd_lightning.reporting.runs import Group, base_metrics, final_metric_names, mean_std


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


def diagnostics_table(groups: list[Group], columns: list[str]) -> str:
    """Per setting, each diagnostic's mean over the last DIAGNOSTICS_WINDOW steps (then over seeds)."""
    header = ["setting", *(column.rsplit("/", 1)[-1] for column in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        values = [window_mean(group.curves, column) for column in columns]
        cells = [f"{value:.3f}" if value is not None else "—" for value in values]
        lines.append(f"| {group.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
