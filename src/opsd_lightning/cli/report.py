"""`opsd-report <multirun dir>`: aggregate a Hydra multirun into a markdown table and PNG plots.

Jobs are grouped by their overrides without `seed=...`, so seeds of one setting are averaged
(mean ± std). Writes `report.md`, `accuracy_vs_tokens.png` and, when the jobs logged CSV,
`training_curves.png`, `learning_curves.png` (held-out avg@k against generated tokens, from in-training
validation) and `diagnostics.png` (the `train/diag/*` distillation diagnostics) into the multirun folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opsd_lightning.reporting.curves import DIAGNOSTICS_WINDOW, diagnostic_columns, learning_curve_metric
from opsd_lightning.reporting.plots import (
    plot_accuracy_vs_tokens,
    plot_diagnostics,
    plot_learning_curves,
    plot_training_curves,
)
from opsd_lightning.reporting.runs import collect, final_metric_names
from opsd_lightning.reporting.tables import diagnostics_table, markdown_table, per_seed_table


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
