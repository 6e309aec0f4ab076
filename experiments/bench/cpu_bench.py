"""`make bench`: the CPU benchmark. One run prints a side-by-side table and writes `cpu.json`.

(a) The loss alone: the project's chunked hidden-state loss vs a naive full-logits implementation
    (`naive_divergence_sum`, the reference), forward+backward at vocab 32k, hidden 512, 2 x 1024
    completion tokens, for forward KL, JSD(0.5) and top-k(20). Peak memory is the peak RSS growth of a
    fresh child process per measurement, time the median of several repetitions (see loss_bench.py).
(b) One OPSD step on the tiny model (random weights, the default size): rollout tokens/s with the whole
    batch generated at once vs in micro-batches, and update tokens/s (teacher + student forward and the
    student backward, per completion token) with the chunked vs the naive loss.

    python experiments/bench/cpu_bench.py --out experiments/bench/cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loss_bench import markdown_table, run_loss_bench  # noqa: E402


def _opsd_module(loaded, backend: str, micro_batch_size: int | None, max_new_tokens: int):
    from opsd_lightning.algorithms import OPSDModule
    from opsd_lightning.contexts import ContextRenderer
    from opsd_lightning.losses import ForwardKL
    from opsd_lightning.teachers import FixedTeacher

    module = OPSDModule(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        contexts=ContextRenderer(loaded.tokenizer),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4),
        divergence=ForwardKL(),
        teacher=FixedTeacher(),
        sampling={"temperature": 1.0, "max_new_tokens": max_new_tokens},
        loss={"backend": backend, "chunk_size": 256},
        micro_batch_size=micro_batch_size,
    )
    module.count_generated = lambda rollout: rollout.num_tokens  # no Trainer attached here
    module.manual_backward = lambda loss: loss.backward()
    return module


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
    prompt = module.contexts.student_batch(batch["problem"])

    def rollout_rate(rows_per_call: int) -> float:
        rates = []
        for repeat in range(repeats + 1):
            start, tokens = time.perf_counter(), 0
            for offset in range(0, batch_size, rows_per_call):
                part = prompt.rows(slice(offset, offset + rows_per_call))
                tokens += module.rollout(part, module.sampling, seed=repeat).num_tokens
            if repeat:  # the first call warms up
                rates.append(tokens / (time.perf_counter() - start))
        return statistics.median(rates)

    rollout = module.rollout(prompt, module.sampling, seed=0)
    teacher_prompt = module.contexts.teacher_batch(batch["problem"], batch["solution"])
    mask = rollout.completion_mask
    tokens = int(mask.sum())

    def update_rate(backend: str) -> float:
        step = _opsd_module(loaded, backend, micro_batch_size, max_new_tokens)
        rows = step.row_slices(batch_size)
        times = []
        for repeat in range(repeats + 1):
            loaded.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            for part in rows:
                loss = step.divergence_sum(
                    prompt.rows(part),
                    teacher_prompt.rows(part),
                    rollout.completion_ids[part],
                    mask[part],
                    mask[part],
                )
                loss.backward()
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
            "naive": round(update_rate("naive"), 1),
        },
    }


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
    results = {
        "machine": loss.pop("machine"),
        "torch": loss.pop("torch"),
        "loss": loss,
        "opsd_step": step,
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
    print(f"| update, naive loss | {update['naive']:,.0f} |")
    print(f"\nWritten: {args.out} ({results['wall_seconds']} s)")


if __name__ == "__main__":
    main()
