"""A Hydra multirun's jobs, grouped by setting: their metrics.json, CSV rows, seeds and labels.

Jobs are grouped by their overrides without `seed=...`, so seeds of one setting are averaged (mean ± std).
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Group:
    """All seeds of one setting."""

    label: str
    metrics: list[dict] = field(default_factory=list)
    curves: list[list[dict[str, str]]] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    # One (metrics.json, CSV rows) pair per job; rows are [] when the job logged no CSV.
    runs: list[tuple[dict, list[dict[str, str]]]] = field(default_factory=list)


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
