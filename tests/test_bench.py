"""The benchmarks still run: every script of experiments/bench/ in its smoke mode (tiny shapes, CPU, strict),
so a refactor cannot break one silently. The smoke runs that need vLLM (its start-up alone is 10-20 s) are
slow tests; `make bench` (cpu_bench.py) runs in the fast one with `--no-vllm`, its vLLM half in a slow one."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench"
CASES = ("forward_kl", "jsd_0.5", "topk20_forward_kl")
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


def run_script(script: str, arguments: list[str], tmp_path) -> dict:
    """`experiments/bench/<script>` with `arguments` in a subprocess: it must exit 0; its JSON."""
    out = tmp_path / "out.json"
    run = subprocess.run(
        [sys.executable, str(BENCH / script), *arguments, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # 109 s (216 s when other jobs loaded the 2 cores ~6x over): make test-all
@needs_vllm
def test_gpu_rollout_smoke_measures_every_section(tmp_path):
    results = run_script("gpu_rollout.py", ["--smoke"], tmp_path)
    rollouts = results["rollouts"]
    engines = ("hf_dynamic", "hf_static", "vllm")
    assert all(f"{engine}_b{batch}" in rollouts for engine in engines for batch in (4, 8))
    assert {"full_s", "lora_merged_s"} <= results["weight_sync"].keys()
    assert {"sync_s", "tokens_per_s_b4_adapter_active"} <= results["adapter_only"].keys()
    for engine in ("hf", "vllm"):
        assert {"generate_s", "sync_s", "train_s"} <= results["opsd_step"][engine]["last_step"].keys()
    batched = results["batched_step"]
    assert (batched["prompts_per_step"], batched["micro_batch_size"]) == (8, 2)
    for engine in ("hf", "vllm"):
        one, many = batched[engine]["batched"], batched[engine]["accumulated"]
        assert (one["generate_calls"], many["generate_calls"]) == (1, 4)  # one call per step, or four
        for step in (one, many):
            assert 0 < step["tokens"] <= 8 * batched["new_tokens"]
            assert step["train_s"] == pytest.approx(
                step["step_s"] - step["generate_s"] - step["sync_s"], abs=2e-3
            )
        speedup = many["generate_s"] / one["generate_s"]
        assert batched[engine]["generate_speedup"] == pytest.approx(speedup, abs=0.01 + 1e-3 * speedup)
    # vLLM's CPU backend has no sleep mode: the section says so instead of measuring
    assert "no sleep mode" in results["sleep_mode"]["skipped"]
    for section in ("rollouts", "weight_sync", "adapter_only", "opsd_step", "batched_step"):
        for path, value in numbers(results[section]):
            if path[0] == "hf" and path[-1] == "sync_s":
                assert value == 0  # HF generates from the live model: nothing to sync
            else:
                assert value > 0, (section, path)
    assert all(row["measured"] is not None for row in results["targets"].values())


def _cpu_bench(results: dict) -> list:
    assert results["rollout_engines"]["engines"]["vllm"] == "skipped (--no-vllm)"
    engines = results["rollout_engines"]["engines"]
    return [
        *(
            numbers(results["loss"]["cases"][case][impl]["ms"])
            for case in CASES
            for impl in ("naive", "chunked")
        ),
        numbers(results["opsd_step"]["rollout_tokens_per_s"]),
        numbers(results["opsd_step"]["update_tokens_per_s"]),
        *(numbers(engines["hf"][mode]["tokens_per_s"]) for mode in ("greedy", "recipe")),
    ]


def _loss_bench(results: dict) -> list:
    cases = results["cases"]
    return [
        numbers(cases[case][impl]["ms"])
        for case in CASES
        for impl in ("naive", "chunked", "chunked_recompute")
    ]


def _objective_cost(results: dict) -> list:
    assert len(results["cases"]) == 5
    return [numbers({name: row["ms"] for name, row in results["cases"].items()})]


def _gpu_bench(records: list) -> list:
    (numerics,) = [row for row in records if row["what"] == "numerics_bf16_weight_vs_fp32_naive"]
    assert numerics["loss_rel_diff"] < 1e-5  # float32 in the smoke: chunked == naive up to rounding
    rollouts = {row["cache"]: row for row in records if row["what"] == "rollout"}  # the warm call last
    steps = {row["loss"]: row for row in records if row["what"] == "train_step"}
    (done,) = [row for row in records if row["what"] == "done"]
    return [
        *(numbers(rollouts[cache]["tokens_per_s"]) for cache in ("dynamic", "static")),
        *(numbers(steps[loss]["completion_tokens_per_s"]) for loss in ("naive", "chunked_8")),
        numbers(done["total_s"]),
    ]


def _gpu_opsd_step(results: dict) -> list:
    assert results["adapters_moved_the_student"] and results["reloaded_max_abs_diff"] == 0  # float32: exact
    assert len(results["step_seconds"]) == 2
    return [numbers(results["step_seconds"]), numbers(results["rollout_tokens_per_s"])]


# script -> (its arguments besides --out, the measured numbers of its JSON that must be > 0)
SMOKES = {
    "cpu_bench.py": (["--smoke", "--no-vllm"], _cpu_bench),
    "loss_bench.py": (["--smoke"], _loss_bench),
    "objective_cost.py": (["--smoke"], _objective_cost),
    "gpu_bench.py": (["--smoke"], _gpu_bench),
    "gpu_opsd_step.py": (["--smoke", "--workdir", "{tmp}"], _gpu_opsd_step),
}


def test_every_bench_script_is_smoke_tested():
    """A new script in experiments/bench/ (a file with a `__main__` block; the others are its helpers) gets a
    smoke run here, or in the slow vLLM tests below."""
    scripts = {path.name for path in BENCH.glob("*.py") if 'if __name__ == "__main__":' in path.read_text()}
    assert scripts == SMOKES.keys() | {"gpu_rollout.py", "vllm_sampling.py"}


@pytest.mark.parametrize("script", SMOKES)
def test_bench_script_smoke_runs(script, tmp_path):
    """Each script at tiny shapes in a subprocess: it exits 0 and measures positive numbers."""
    arguments, measured = SMOKES[script]
    results = run_script(script, [a.format(tmp=tmp_path) for a in arguments], tmp_path)
    values = [value for group in measured(results) for _, value in group]
    assert values and all(value > 0 for value in values), values


@needs_vllm
@pytest.mark.slow
def test_cpu_bench_rollout_section_with_vllm(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import cpu_bench
    from vllm_sampling import SMOKE

    result = cpu_bench.run_rollout_bench(SMOKE)
    for engine in ("hf", "vllm"):
        for mode in ("greedy", "recipe"):
            assert result["engines"][engine][mode]["tokens_per_s"] > 0
    assert result["vllm_over_hf"]["greedy"] > 0 and result["vllm_over_hf"]["recipe"] > 0
    assert "vllm / hf" in cpu_bench.rollout_table(result)


@pytest.mark.slow  # ~50 s on 2 cores (vLLM's start-up): make test-all
@needs_vllm
def test_vllm_sampling_smoke_times_every_setting(tmp_path):
    settings = run_script("vllm_sampling.py", ["--smoke"], tmp_path)["settings"]
    assert {
        "greedy",
        "recipe_vllm_native",
        "recipe_project",
        "recipe_project_no_row_seeds",
    } <= settings.keys()
    assert all(row["tokens_per_s"] > 0 for row in settings.values())
