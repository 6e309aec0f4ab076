"""vLLM's sampling cost on a CPU, setting by setting: why the recipes' top-p + top-k was slow, and what
`rollout=vllm` does about it (`rollout/vllm_sampling.py`: top-p applied within the top-k by a logits
processor, the same distribution without sorting the vocabulary).

A Qwen3-shaped model with random weights and the full Qwen3 vocabulary (151,936 ids: the sampler works on
[rows, vocab] logits, so the vocabulary is what matters), few narrow layers, `P` random prompts of 16 ids,
`N` new tokens each (no EOS stops them: every call generates P x N tokens). One engine; each setting gets a
short warm-up call, then `--repeats` timed calls (the median is reported). Settings:

- greedy; temperature 1.1 alone; top-k 20 alone; top-p 0.95 alone (vLLM sorts the vocabulary);
- the recipe (T 1.1, top-p 0.95, top-k 20) handed to vLLM as it is (`vllm_native`: it sorts);
- the recipe as `rollout=vllm` sends it (`project`: top-p within the top-k by our processor), with per-row
  seeds and the sampled tokens' log-probs, as in training; then without seeds (vLLM's global generator), and
  without log-probs, to price each.

    python experiments/bench/vllm_sampling.py --out experiments/bench/vllm_sampling.json
    python experiments/bench/vllm_sampling.py --smoke        # tiny shapes, seconds (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RECIPE = {"temperature": 1.1, "top_p": 0.95, "top_k": 20}


@dataclasses.dataclass
class Plan:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    prompts: int
    new_tokens: int
    repeats: int


FULL = Plan(
    vocab_size=151_936, hidden_size=512, num_layers=2, num_heads=8, prompts=32, new_tokens=128, repeats=1
)
SMOKE = Plan(vocab_size=1024, hidden_size=64, num_layers=1, num_heads=2, prompts=2, new_tokens=4, repeats=1)


def build_model(plan: Plan) -> torch.nn.Module:
    """A Qwen3 with random weights; head dimension hidden / heads (32 or 64: vLLM's CPU attention). Also
    `cpu_bench.py`'s section (c) model."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=plan.vocab_size,
        hidden_size=plan.hidden_size,
        intermediate_size=3 * plan.hidden_size,
        num_hidden_layers=plan.num_layers,
        num_attention_heads=plan.num_heads,
        num_key_value_heads=max(plan.num_heads // 2, 1),
        head_dim=plan.hidden_size // plan.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).eval()


def random_prompt_ids(plan: Plan, length: int = 16) -> list[list[int]]:
    """`plan.prompts` prompts of `length` random ids (seeded): a random model has no text to read."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, plan.vocab_size, (plan.prompts, length), generator=generator).tolist()


def settings(plan: Plan) -> dict:
    """Each setting's `SamplingParams` for the P prompts."""
    from vllm import SamplingParams

    from opsd_lightning.rollout import SamplingConfig
    from opsd_lightning.rollout.vllm_sampling import sampling_params

    common = {"max_tokens": plan.new_tokens, "ignore_eos": True}
    rows = plan.prompts

    def native(**filters) -> list:
        return [SamplingParams(seed=row, **common, **filters) for row in range(rows)]

    def project(seed: int | None, logprobs: bool) -> list:
        config = SamplingConfig(**RECIPE, max_new_tokens=plan.new_tokens)
        params = sampling_params(config, [], seed, rows)
        for item in params:
            item.ignore_eos, item.logprobs = True, item.logprobs if logprobs else None
        return params

    return {
        "greedy": [SamplingParams(temperature=0.0, **common) for _ in range(rows)],
        "temperature_only": native(temperature=1.1),
        "top_k_only": native(temperature=1.1, top_k=20),
        "top_p_only": native(temperature=1.1, top_p=0.95),
        "recipe_vllm_native": native(**RECIPE),
        "recipe_project": project(seed=0, logprobs=True),
        "recipe_project_no_row_seeds": project(seed=None, logprobs=True),
        "recipe_project_no_logprobs": project(seed=0, logprobs=False),
    }


def measure(plan: Plan) -> dict:
    from vllm import TokensPrompt

    from opsd_lightning.contexts.batches import left_pad
    from opsd_lightning.rollout import SamplingConfig, VLLMEngine

    model = build_model(plan)
    engine = VLLMEngine(
        kv_cache_memory_bytes=2**30, max_num_seqs=plan.prompts, max_model_len=512, enforce_eager=True
    )
    ids = random_prompt_ids(plan)
    prompts = [TokensPrompt(prompt_token_ids=row) for row in ids]
    start = time.perf_counter()
    first = SamplingConfig(temperature=0.0, max_new_tokens=1)
    engine.generate(model, left_pad(ids[:1], 0), first, [], 0)  # start and first sync, outside the timings
    started = time.perf_counter() - start
    results = {}
    for name, params in settings(plan).items():
        warm = params[0].clone()
        warm.max_tokens = 2
        engine.llm.generate(prompts[:2], [warm] * 2, use_tqdm=False)
        seconds = []
        for _ in range(plan.repeats):
            start = time.perf_counter()
            outputs = engine.llm.generate(prompts, params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
        tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
        assert tokens == plan.prompts * plan.new_tokens, (name, tokens)
        median = statistics.median(seconds)
        results[name] = {"seconds": round(median, 3), "tokens_per_s": round(tokens / median, 1)}
        print(f"{name:32s} {median:8.2f} s {tokens / median:10.1f} tok/s", flush=True)
    return {"engine_start_s": round(started, 1), "settings": results}


def table(results: dict) -> str:
    rows = ["| setting | seconds | tok/s |", "|---|---|---|"]
    for name, row in results["settings"].items():
        rows.append(f"| {name} | {row['seconds']} | {row['tokens_per_s']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    if args.repeats:
        plan = dataclasses.replace(plan, repeats=args.repeats)
    results = {
        "plan": dataclasses.asdict(plan),
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        **measure(plan),
    }
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
