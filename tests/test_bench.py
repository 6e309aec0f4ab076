"""The benchmarks still run: the GPU rollout script in its CPU smoke mode, and `make bench`'s rollout part."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench"
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def numbers(tree, path=()):
    """Every number in a JSON tree, with its path of keys."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, (*path, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from numbers(value, (*path, index))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield path, tree


@pytest.mark.slow  # ~30-70 s on 2 cores: make test-all
@needs_vllm
def test_gpu_rollout_smoke_measures_every_section(tmp_path):
    out = tmp_path / "gpu_rollout.json"
    script = BENCH / "gpu_rollout.py"
    run = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    rollouts = results["rollouts"]
    engines = ("hf_dynamic", "hf_static", "vllm")
    assert all(f"{engine}_b{batch}" in rollouts for engine in engines for batch in (4, 8))
    assert {"full_s", "lora_merged_s"} <= results["weight_sync"].keys()
    assert {"sync_s", "tokens_per_s_b4_adapter_active"} <= results["adapter_only"].keys()
    for engine in ("hf", "vllm"):
        assert {"generate_s", "sync_s", "train_s"} <= results["opsd_step"][engine]["last_step"].keys()
    for section in ("rollouts", "weight_sync", "adapter_only", "opsd_step"):
        for path, value in numbers(results[section]):
            if path[0] == "hf" and path[-1] == "sync_s":
                assert value == 0  # HF generates from the live model: nothing to sync
            else:
                assert value > 0, (section, path)
    assert all(row["measured"] is not None for row in results["targets"].values())


def test_cpu_bench_rollout_section_without_vllm(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import cpu_bench

    monkeypatch.setattr(cpu_bench, "vllm_installed", lambda: False)
    result = cpu_bench.run_rollout_bench(num_prompts=2, max_new_tokens=2, repeats=1)
    hf = result["engines"]["hf"]
    assert hf["greedy"]["tokens_per_s"] > 0 and hf["sampled"]["tokens_per_s"] > 0
    assert result["engines"]["vllm"].startswith("not installed")
    assert "not installed" in cpu_bench.rollout_table(result)


@needs_vllm
@pytest.mark.slow
def test_cpu_bench_rollout_section_with_vllm(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import cpu_bench

    result = cpu_bench.run_rollout_bench(num_prompts=2, max_new_tokens=2, repeats=1)
    for engine in ("hf", "vllm"):
        assert result["engines"][engine]["greedy"]["tokens_per_s"] > 0
        assert result["engines"][engine]["sampled"]["tokens_per_s"] > 0
    assert "vllm / hf" in cpu_bench.rollout_table(result)


@pytest.mark.slow  # ~50 s on 2 cores (vLLM's start-up): make test-all
@needs_vllm
def test_vllm_sampling_smoke_times_every_setting(tmp_path):
    out = tmp_path / "vllm_sampling.json"
    script = BENCH / "vllm_sampling.py"
    run = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    settings = json.loads(out.read_text())["settings"]
    assert {
        "greedy",
        "recipe_vllm_native",
        "recipe_project",
        "recipe_project_no_row_seeds",
    } <= settings.keys()
    assert all(row["tokens_per_s"] > 0 for row in settings.values())
