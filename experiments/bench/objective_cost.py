"""CPU timing: what the diagnostics and the token weights add to the chunked loss (forward + backward).

Plain forward KL, + diagnostics, + position weights, + the entropy gate, + the tail bucket, each the median of
`--repeats` steps after one warm-up step, in one process, with the ratio to plain forward KL:

    python experiments/bench/objective_cost.py [--tokens 512 --vocab 4096 --hidden 256 --chunk 256] [--out f]
    python experiments/bench/objective_cost.py --smoke --out <file.json>   # tiny shapes, seconds (a test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from opsd_lightning.objectives import ForwardKL, TopK
from opsd_lightning.objectives.chunked import chunked_objective_sum
from opsd_lightning.objectives.weighting import EntropyGate, PositionWeighting, TokenFeatures


def step_seconds(inputs: dict, repeats: int, **objective) -> float:
    """Median seconds of one forward + backward of the chunked objective."""
    times = []
    others = {key: value for key, value in inputs.items() if key != "student_hidden"}
    for _ in range(repeats + 1):
        hidden = inputs["student_hidden"].detach().requires_grad_()
        start = time.perf_counter()
        chunked_objective_sum(hidden, **others, **objective).loss_sum.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat, seconds")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.vocab, args.hidden, args.chunk, args.repeats = 64, 256, 32, 16, 1
    torch.manual_seed(0)
    n, v, h = args.tokens, args.vocab, args.hidden
    weight = (torch.randn(v, h) / h**0.5).requires_grad_()
    inputs = {
        "student_hidden": torch.randn(n, h),
        "teacher_hidden": torch.randn(n, h),
        "weight": weight,
        "token_ids": torch.randint(v, (n,)),
        "chunk_size": args.chunk,
    }
    features = TokenFeatures(position=torch.arange(n) % 64, length=torch.full((n,), 64))
    weighted = {"divergence": ForwardKL(), "features": features}
    cases = {
        "forward KL": {"divergence": ForwardKL()},
        "+ diagnostics": {"divergence": ForwardKL(), "diagnostics": True},
        "+ position weights": {**weighted, "weighting": PositionWeighting()},
        "+ entropy gate": {**weighted, "weighting": EntropyGate()},
        "tail top-20": {"divergence": TopK(ForwardKL(), k=20, tail=True)},
    }
    threads = torch.get_num_threads()
    print(f"N={n} V={v} H={h} chunk={args.chunk}, {threads} threads, median of {args.repeats} steps")
    reference, results = None, {}
    for name, objective in cases.items():
        seconds = step_seconds(inputs, args.repeats, **objective)
        reference = reference or seconds
        results[name] = {"ms": round(seconds * 1e3, 3), "ratio": round(seconds / reference, 3)}
        print(f"{name:<20} {seconds * 1e3:8.1f} ms  {seconds / reference:5.2f}x")
    if args.out:
        settings = {"tokens": n, "vocab": v, "hidden": h, "chunk": args.chunk, "repeats": args.repeats}
        args.out.write_text(
            json.dumps({"settings": settings, "threads": threads, "cases": results}, indent=2)
        )


if __name__ == "__main__":
    main()
