"""Each `make experiment NAME=<name>` run end to end in smoke mode: its run.sh (every sweep it launches and
every report it writes) on a model, data and step budget small enough for seconds, so that a run.sh, its
experiment config or its report script cannot rot between the (long) measured runs.

Smoke mode is the run.sh's own Hydra overrides (run.sh passes its arguments to every sweep): one seed, a tiny
random model (no warm-up), a few problems, one or two optimizer steps.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(os.sys.executable).parent)

# What every experiment's smoke run overrides: one seed, a tiny model warmed up for 2 steps (an experiment's
# own `warmup:` settings would bring back a `warmup=none`), a few problems and samples.
SMOKE = [
    "seed=0",
    "warmup.steps=2",
    "warmup.num_examples=100",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=1",
    "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "data.train_size=16",
    "data.val_size=4",
    "data.batch_size=2",
    "++algorithm.sampling.max_new_tokens=8",
    "evaluation.sampling.max_new_tokens=8",
    "benchmark.heldout.limit=2",
    "callbacks=none",
]
# Per experiment: (extra smoke overrides, the job folders its run.sh writes).
EXPERIMENTS = {
    # Episodes of at most 2 turns and 24 tokens; validation after step 1 of 2 (the curves' middle point).
    "tool_use": (
        ["environment.max_turns=2", "environment.max_tokens=24", "trainer.max_steps=2",
         "trainer.val_check_interval=1"],
        ["opsd_0", "grpo_0"],
    ),
}  # fmt: skip


def run_experiment(name: str, extra: list[str], out: Path) -> subprocess.CompletedProcess:
    """`make experiment NAME=<name> ARGS=...` as the Makefile runs it: run.sh with the venv's bin on PATH."""
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "OUT": str(out),
        "OPSD_CACHE_DIR": str(out / "cache"),
    }
    command = ["bash", f"experiments/{name}/run.sh", *SMOKE, *extra]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # two sweeps and the reports, each a process importing torch: minutes on a busy 2-core CPU
def test_tool_use_runs_base_grpo_and_opsd_and_writes_its_reports(tmp_path):
    extra, jobs = EXPERIMENTS["tool_use"]
    result = run_experiment("tool_use", extra, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = {job: json.loads((tmp_path / job / "metrics.json").read_text()) for job in jobs}
    assert all(m["optimizer_steps"] == 2 for m in metrics.values())
    # The base is evaluated once per seed (by OPSD), in episodes: the tool metrics are there.
    assert "base" in metrics["opsd_0"] and "base" not in metrics["grpo_0"]
    for name in ("avg@4", "tool_calls", "tool_error_rate", "turns"):
        assert f"val/heldout/{name}" in metrics["opsd_0"]["base"]
        assert f"test/heldout/{name}" in metrics["grpo_0"]["final"]
    # Both algorithms sample in the environment: the multi-turn sampler's metrics are logged.
    for job in jobs:
        assert {"train/tool_calls", "train/tool_errors", "train/turns"} <= set(metrics[job]["train"])
    # GRPO draws group_size=4 episodes per problem: 4x OPSD's generated tokens at most (budgets equal).
    assert 0 < metrics["opsd_0"]["generated_tokens"] <= metrics["grpo_0"]["generated_tokens"]
    report = (tmp_path / "tool_report.md").read_text()
    rows = [line.split(" | ")[0] for line in report.splitlines() if line.startswith("| ")]
    # Hydra writes the bool override back as `False`.
    assert rows[1:4] == ["| base (no training)", "| algorithm=grpo validate_before=False", "| algorithm=opsd"]
    for written in ("report.md", "training_curves.png", "tool_curves.png"):
        assert (tmp_path / written).stat().st_size > 0
