"""Hyperparameter search with Hydra's Optuna sweeper (`hydra/sweeper=optuna`) through the real CLI: each trial
is an `opsd-train` job on the tiny model, and what a job returns (`optimized_metric`) is what Optuna ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from tests.cli.test_train import run_multirun

LR_RANGE = (1e-4, 1e-2)
DIVERGENCES = {"forward_kl", "reverse_kl"}
# The untrained tiny model scores 0 on every trial, so the search maximises the last step's loss instead:
# it differs between trials, which lets the test tell whether Optuna got each job's own value.
METRIC = "train/loss"


def job_params(job_dir: Path) -> dict[str, str]:
    """The searched overrides a trial ran with, from its .hydra/overrides.yaml."""
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    pairs = dict(o.split("=", 1) for o in overrides)
    return {key: pairs[key] for key in ("algorithm.optimizer.lr", "divergence")}


def test_an_optuna_search_ranks_the_jobs_by_their_returned_metric(tmp_path):
    sweep = (
        "hydra/sweeper=optuna hydra.sweeper.direction=maximize hydra.sweeper.n_trials=2 "
        "hydra.sweeper.n_jobs=1 hydra.sweeper.sampler.seed=0 "
        f"algorithm.optimizer.lr=tag(log,interval({LR_RANGE[0]},{LR_RANGE[1]})) "
        f"divergence=choice({','.join(sorted(DIVERGENCES))}) optimized_metric={METRIC}"
    )
    jobs = run_multirun(sweep, tmp_path, OMP_NUM_THREADS="1")
    assert len(jobs) == 2
    values = [json.loads(job.read_text())["train"][METRIC] for job in jobs]
    assert values[0] != values[1]  # otherwise the best job is not identifiable

    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    best = results["best_params"]
    assert set(best) == {"algorithm.optimizer.lr", "divergence"}
    assert LR_RANGE[0] <= best["algorithm.optimizer.lr"] <= LR_RANGE[1] and best["divergence"] in DIVERGENCES
    assert math.isclose(results["best_value"], max(values), rel_tol=1e-12)
    best_job = jobs[values.index(max(values))].parent
    ran_with = job_params(best_job)
    assert float(ran_with["algorithm.optimizer.lr"]) == best["algorithm.optimizer.lr"]
    assert ran_with["divergence"] == best["divergence"]
