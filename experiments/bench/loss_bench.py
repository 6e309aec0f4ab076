"""CPU benchmark: the chunked hidden-state divergence loss against full-vocabulary logits, forward+backward.

Each (case, implementation) runs in a fresh spawned process, so its peak RSS is its own: we report the
growth of `ru_maxrss` (a high-water mark) over its value right after the inputs were created, and the
median wall time of `repeats` forward+backward steps after one warm-up step.

    python experiments/bench/loss_bench.py --out <file.json>   (`make bench` runs it through cpu_bench.py)
    python experiments/bench/loss_bench.py --smoke --out <file.json>   # tiny shapes, seconds (a test)
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

CASES = ("forward_kl", "jsd_0.5", "topk20_forward_kl")
IMPLEMENTATIONS = ("naive", "chunked", "chunked_recompute")
# Every case and implementation at a shape that takes seconds, all in one child process (a fresh one per
# measurement would cost a torch import each): the code paths are checked, the memory figures mean nothing.
SMOKE = {"vocab": 512, "hidden": 32, "tokens": 64, "chunk_size": 16, "repeats": 1, "fresh_processes": False}


def _divergence(case: str, temperature: float):
    from opsd_lightning.objectives.divergences import ForwardKL, GeneralizedJSD, TopK

    builders = {
        "forward_kl": lambda: ForwardKL(temperature=temperature),
        "jsd_0.5": lambda: GeneralizedJSD(beta=0.5, temperature=temperature),
        "topk20_forward_kl": lambda: TopK(ForwardKL(temperature=temperature), k=20),
    }
    return builders[case]()


def _max_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    """Resident set size now (the second field of /proc/self/statm, in pages)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure(case: str, implementation: str, settings: dict[str, Any]) -> dict[str, float]:
    """Runs in a fresh child process: peak RSS growth and median time of one forward+backward."""
    import torch

    from opsd_lightning.objectives.chunked import chunked_divergence_sum, naive_divergence_sum

    torch.set_num_threads(settings["threads"])
    tokens, hidden, vocab = settings["tokens"], settings["hidden"], settings["vocab"]
    generator = torch.Generator().manual_seed(settings["seed"])
    # In place throughout: a freed temporary would lift the high-water mark above the baseline's RSS.
    student = torch.randn(tokens, hidden, generator=generator)
    # A teacher near the student, as in self-distillation; logits of unit scale.
    teacher = torch.randn(tokens, hidden, generator=generator).mul_(0.5).add_(student)
    weight = torch.randn(vocab, hidden, generator=generator).div_(hidden**0.5)
    token_ids = torch.randint(0, vocab, (tokens,), generator=generator)
    student.requires_grad_()
    weight.requires_grad_(settings["weight_requires_grad"])
    divergence = _divergence(case, settings["temperature"])

    def step() -> float:
        if implementation == "naive":
            loss = naive_divergence_sum(student, teacher, weight, token_ids, divergence)
        else:
            recompute = implementation == "chunked_recompute"
            loss = chunked_divergence_sum(
                student, teacher, weight, token_ids, divergence, settings["chunk_size"], recompute=recompute
            )
        loss.backward()
        student.grad = weight.grad = None
        return loss.item()

    gc.collect()
    # Right after the inputs exist and before anything vocabulary-sized per token was allocated. The
    # increase is taken over the current RSS: if the high-water mark were already above it (the slack),
    # a step peaking in that gap would still count.
    baseline_mib = _rss_mib()
    slack_mib = _max_rss_mib() - baseline_mib
    loss_value = step()
    times = []
    for _ in range(settings["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "peak_mib": round(_max_rss_mib() - baseline_mib, 1),
        "baseline_rss_mib": round(baseline_mib, 1),
        "baseline_slack_mib": round(slack_mib, 1),
        "ms": round(1000 * statistics.median(times), 1),
        "loss": loss_value,
    }


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        # The machine may be shared; a high load makes every time here slower and noisier.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def run_loss_bench(
    vocab: int = 32000,
    hidden: int = 512,
    tokens: int = 2 * 1024,
    chunk_size: int = 256,
    repeats: int = 5,
    temperature: float = 1.0,
    weight_requires_grad: bool = True,
    cases: tuple[str, ...] = CASES,
    implementations: tuple[str, ...] = IMPLEMENTATIONS,
    threads: int | None = None,
    seed: int = 0,
    fresh_processes: bool = True,
) -> dict[str, Any]:
    """Measure every (case, implementation), each in its own spawned process (one for all of them without
    `fresh_processes`); returns the JSON dict."""
    import torch

    settings = {
        "vocab": vocab,
        "hidden": hidden,
        "tokens": tokens,
        "chunk_size": chunk_size,
        "repeats": repeats,
        "warmup": 1,
        "temperature": temperature,
        "dtype": "float32",
        "weight_requires_grad": weight_requires_grad,
        "threads": threads or len(os.sched_getaffinity(0)),
        "seed": seed,
    }
    spawn = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {"machine": _machine(), "torch": torch.__version__, "settings": settings}
    results["cases"] = {}
    with ExitStack() as stack:
        shared = None if fresh_processes else stack.enter_context(ProcessPoolExecutor(1, mp_context=spawn))
        for case in cases:
            measured: dict[str, Any] = {}
            for implementation in implementations:
                # A fresh process per measurement: ru_maxrss never goes down within one.
                with nullcontext(shared) if shared else ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    measured[implementation] = pool.submit(_measure, case, implementation, settings).result()
                print(f"{case} {implementation}: {measured[implementation]}", flush=True)
            if "naive" in measured:
                naive = measured["naive"]
                for implementation in implementations:
                    if implementation == "naive":
                        continue
                    suffix = "" if implementation == "chunked" else f"_{implementation}"
                    chunked = measured[implementation]
                    # None where naive grew nothing: after another measurement in a shared process
                    grown = naive["peak_mib"] > 0
                    peak = round(chunked["peak_mib"] / naive["peak_mib"], 3) if grown else None
                    measured[f"peak_memory_ratio{suffix}"] = peak
                    measured[f"time_ratio{suffix}"] = round(chunked["ms"] / naive["ms"], 3)
            results["cases"][case] = measured
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def markdown_table(results: dict[str, Any], implementation: str = "chunked") -> str:
    """case | naive peak MiB | <impl> peak MiB | peak_memory_ratio | naive ms | <impl> ms | time_ratio."""
    suffix = "" if implementation == "chunked" else f"_{implementation}"
    lines = [
        f"| case | naive peak MiB | {implementation} peak MiB | peak_memory_ratio | naive ms | "
        f"{implementation} ms | time_ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, measured in results["cases"].items():
        naive, chunked = measured["naive"], measured[implementation]
        peak = measured["peak_memory_ratio" + suffix]
        lines.append(
            f"| {case} | {naive['peak_mib']:.0f} | {chunked['peak_mib']:.0f} | "
            f"{'-' if peak is None else f'{peak:.3f}'} | {naive['ms']:.0f} | {chunked['ms']:.0f} | "
            f"{measured['time_ratio' + suffix]:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/bench/cpu_loss.json"))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=2 * 1024)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--frozen-weight", action="store_true", help="lm_head weight without grad (LoRA)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument(
        "--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS
    )
    parser.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one child process, seconds")
    args = parser.parse_args()
    if "naive" not in args.implementations:
        parser.error("--implementations must include naive (the ratios are taken against it)")
    shape = {
        "vocab": args.vocab,
        "hidden": args.hidden,
        "tokens": args.tokens,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
    }
    results = run_loss_bench(
        **(SMOKE if args.smoke else shape),
        temperature=args.temperature,
        weight_requires_grad=not args.frozen_weight,
        cases=tuple(args.cases),
        implementations=tuple(args.implementations),
        threads=args.threads,
    )
    for implementation in args.implementations:
        if implementation != "naive":
            print(f"\n{markdown_table(results, implementation)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
