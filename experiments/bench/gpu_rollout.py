"""Rollouts at the Qwen3-1.7B shape on one GPU: HF `generate` vs vLLM, weight sync, real OPSD steps.

One command on one H100/H200 (random weights, the real Qwen3 tokenizer; needs the `vllm` extra):

    python experiments/bench/gpu_rollout.py --tokenizer <qwen3 tokenizer folder> \\
        --out experiments/bench/results/gpu_rollout_h200.json

Sections, each written to the JSON as soon as it is measured (on the GPU a failing section records its
error and the others still run):
- rollouts: tokens/s of a warm call at batch 64 and 256 x 1,024 new tokens (thinking-mode chat prompts,
  T=1.1, top-p 0.95, top-k 20) with HF's dynamic KV cache, HF's static cache, and `rollout=vllm`
  (its start-up reported apart);
- weight_sync: seconds to bring the engine up to date with the model: full weights, LoRA r=64 merged on
  the fly (`engine_weights`, what `rollout=vllm` does), and adapter-only (vLLM's own LoRA: save the
  adapter, load it into an engine started with `enable_lora`), with that engine's decode speed;
- opsd_step: one step of the real path (`OnPolicyModule` with OPSD's parts in a Lightning `Trainer`, LoRA
  r=64, gradient checkpointing, the chunked loss, the fixed teacher, 32 prompts x 1,024 tokens) with
  `rollout=hf` and `rollout=vllm`: generate / sync / train seconds and peak memory;
- batched_step: the recipes' optimizer step, its 8 prompts generated in one call and trained 2 rows per
  backward (`micro_batch_size=2`, `accumulate_grad_batches=1`), against the old way, one generate per
  data batch of 2 accumulated over 4: generate / sync / train seconds of each and their ratios
  (`generate_speedup`, `step_speedup`: old over batched; `train_ratio`: batched over old, ~1), with
  `rollout=hf` and `rollout=vllm`;
- sleep_mode: one engine with `sleep_mode=True` generating a step's 32 prompts after each weight change,
  at `sleep_level` 2 then 1: seconds of each phase of a generation (wake the weights, sync, wake the KV
  cache, generate, sleep; `overhead_s` is all but the generate) and the GPU's free memory awake and asleep
  (`torch.cuda.mem_get_info`; `freed_gib`, and `held_asleep_gib`, what the sleeping engine keeps);
- targets: issue 13's targets next to the measurements.

Expect roughly 20-25 minutes on one H100/H200 (an estimate: HF generate of 1,024 tokens dominates, and its
static cache compiles once per batch size). Under a per-command time limit, run it in parts, each with its
own `--out`: `--sections rollouts`, `--sections weight_sync opsd_step`, `--sections batched_step`, then
`--sections sleep_mode adapter_only` (sections run in this order and build on each other: `weight_sync`
applies LoRA, or the first OPSD section does; the sleep-mode and adapter-only engines start last, beside
the first engine).

The sections' code: rollouts here, weight_sync and adapter_only in `gpu_sync.py`, the OPSD steps and sleep
mode in `gpu_steps.py`.

`--smoke` runs every section on the CPU with a tiny Qwen3 (head dimension 32) and a few tokens, strictly
(any error stops it), so a test checks the script: `python experiments/bench/gpu_rollout.py --smoke`. There
`sleep_mode` records that it was skipped, with `VLLMEngine`'s reason (vLLM's CPU backend has no sleep mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from opsd_lightning.contexts.batches import TokenBatch
from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.data.arith import generate_examples
from opsd_lightning.models import build_tiny_tokenizer, eos_token_ids
from opsd_lightning.models.hf import enable_gradient_checkpointing
from opsd_lightning.models.lora import apply_peft
from opsd_lightning.rollout import HFEngine, Rollout, RolloutEngine, SamplingConfig, VLLMEngine

sys.path.insert(0, str(Path(__file__).parent))
from gpu_opsd_step import LORA  # noqa: E402
from gpu_steps import SAMPLING, measure_batched_step, measure_opsd_step, measure_sleep_mode  # noqa: E402
from gpu_sync import measure_adapter_only, measure_sync  # noqa: E402

# Qwen3-1.7B's config.json, hard-coded so that no model download is needed (the weights are random).
QWEN3_1_7B = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
}
SMOKE_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,  # vLLM's CPU attention needs >= 32
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures, and where: the GPU run or the CPU smoke run."""

    device: str
    dtype: torch.dtype
    precision: str  # Lightning's
    batches: tuple[int, ...]  # rollout batch sizes
    new_tokens: int  # per rollout, in every section
    step_prompts: int  # the OPSD step's batch, and the sleep-mode engine's
    window: tuple[int, int]  # the batched step's (rows per backward, backwards per optimizer step)
    steps: int  # OPSD steps per engine; the first warms up, the last is reported
    warm_calls: int  # rollout calls timed after the first
    sync_repeats: int
    engine: dict  # VLLMEngine options (conf/rollout/vllm.yaml)
    adapter_engine: dict  # memory options of the adapter-only engine (a second one, beside the first)
    sleep_engine: dict  # memory options of the sleep-mode engine (a third one)


GPU_PLAN = Plan(
    device="cuda",
    dtype=torch.bfloat16,
    precision="bf16-true",
    batches=(64, 256),
    new_tokens=1024,
    step_prompts=32,
    window=(2, 4),  # the paper's batch 2 x 4 accumulation steps, per device
    steps=2,
    warm_calls=1,
    sync_repeats=3,
    # 0.45 of an H200: ~60 GiB, a KV cache for 256 x ~1,200 tokens and more; training and the HF model
    # share the rest.
    engine={"gpu_memory_utilization": 0.45, "max_num_seqs": 256, "max_model_len": 2048},
    # vLLM refuses to start unless the free memory covers gpu_memory_utilization, even with a fixed cache.
    adapter_engine={"gpu_memory_utilization": 0.3, "kv_cache_memory_bytes": 20 * 2**30},
    sleep_engine={"gpu_memory_utilization": 0.25, "kv_cache_memory_bytes": 20 * 2**30},
)
SMOKE_PLAN = Plan(
    device="cpu",
    dtype=torch.float32,
    precision="32-true",
    batches=(4, 8),
    new_tokens=6,
    step_prompts=4,
    window=(2, 4),
    steps=2,
    warm_calls=1,
    sync_repeats=2,
    engine={
        "kv_cache_memory_bytes": 32 * 2**20,
        "max_num_seqs": 8,
        "max_model_len": 512,
        "enforce_eager": True,
    },
    adapter_engine={"kv_cache_memory_bytes": 32 * 2**20},
    sleep_engine={},  # VLLMEngine refuses sleep mode on a CPU: the section records that
)


class Bench:
    """The model under test, its tokenizer and prompt renderer, the vLLM engine, and the JSON written."""

    def __init__(self, plan: Plan, tokenizer_path: str | None, out: Path) -> None:
        self.plan, self.out, self.results = plan, out, {}
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.model = build_model(plan, self.tokenizer)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.renderer = ContextRenderer(
            self.tokenizer, student_enable_thinking=True, teacher_enable_thinking=True
        )
        self._vllm: VLLMEngine | None = None

    @property
    def vllm(self) -> VLLMEngine:
        if self._vllm is None:
            self._vllm = VLLMEngine(**self.plan.engine)
        return self._vllm

    def lora_model(self) -> torch.nn.Module:
        """The model with LoRA r=64 (applied once; the later sections keep it)."""
        if not hasattr(self.model, "peft_config"):
            self.model = apply_peft(self.model, LORA)
        return self.model

    def prompts(self, count: int) -> TokenBatch:
        rows = generate_examples(count, seed=0, max_start=30, max_change=20)
        return self.renderer.student_batch([row["problem"] for row in rows]).to(self.plan.device)

    def generate(self, engine: RolloutEngine, prompt: TokenBatch, sampling: SamplingConfig) -> Rollout:
        return engine.generate(
            self.model, prompt, sampling, self.eos_ids, self.tokenizer.pad_token_id, seed=0
        )

    def timed(self, run: Callable[[], object]) -> tuple[float, object]:
        """Wall seconds of `run()`, with the GPU's queued work included."""
        cuda = self.plan.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = run()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, value

    def section(self, name: str, measure: Callable[[Bench], dict], strict: bool) -> None:
        """Measure one section and rewrite the JSON; unless `strict`, an error is recorded and the run goes
        on to the next section."""
        start = time.perf_counter()
        try:
            self.results[name] = measure(self)
        except Exception as error:  # noqa: BLE001 - a failing section is reported, the bench goes on
            if strict:
                raise
            self.results[name] = {"error": repr(error)[:1000]}
        self.results[name]["section_s"] = round(time.perf_counter() - start, 1)
        self.free_memory()
        self.write()
        print(json.dumps({name: self.results[name]}), flush=True)

    def free_memory(self) -> None:
        gc.collect()
        if self.plan.device == "cuda":
            torch.cuda.empty_cache()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1) + "\n")


def load_tokenizer(path: str | None) -> PreTrainedTokenizerBase:
    if path is None:
        return build_tiny_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return tokenizer


def build_model(plan: Plan, tokenizer: PreTrainedTokenizerBase) -> Qwen3ForCausalLM:
    """Random weights in the plan's shape and dtype, built on its device; gradient checkpointing on for the
    OPSD step (generation runs in eval mode, where it is off)."""
    shape = QWEN3_1_7B if plan.device == "cuda" else {"vocab_size": len(tokenizer), **SMOKE_SHAPE}
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = Qwen3Config(**shape, bos_token_id=None, **ids)
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = Qwen3ForCausalLM(config).to(plan.dtype)
    model.set_attn_implementation("sdpa")
    model.generation_config.update(**ids)
    enable_gradient_checkpointing(model, True)
    return model


# ---- rollouts -------------------------------------------------------------------------------------
def rollout_rates(bench: Bench, engine: RolloutEngine, batch: int, cache: str | None) -> dict:
    """The first call (compilation, or vLLM's start-up and first sync) apart, then the warm calls."""
    prompt = bench.prompts(batch)
    sampling = SamplingConfig(**SAMPLING, max_new_tokens=bench.plan.new_tokens, cache_implementation=cache)
    calls = [
        bench.timed(lambda: bench.generate(engine, prompt, sampling))
        for _ in range(bench.plan.warm_calls + 1)
    ]
    (first_s, _), warm = calls[0], calls[1:]
    return {
        "first_call_s": round(first_s, 2),
        "warm_call_s": round(statistics.median(seconds for seconds, _ in warm), 2),
        "tokens": warm[-1][1].num_tokens,
        "tokens_per_s": round(
            statistics.median(rollout.num_tokens / seconds for seconds, rollout in warm), 1
        ),
    }


def measure_rollouts(bench: Bench) -> dict:
    result: dict = {"new_tokens": bench.plan.new_tokens, "sampling": SAMPLING}
    for batch in bench.plan.batches:
        for name, cache in (("hf_dynamic", None), ("hf_static", "static")):
            result[f"{name}_b{batch}"] = rollout_rates(bench, HFEngine(), batch, cache)
            bench.free_memory()  # the KV caches' memory, before vLLM claims its share
    for batch in bench.plan.batches:  # the first call starts the engine and copies the weights in
        result[f"vllm_b{batch}"] = rollout_rates(bench, bench.vllm, batch, None)
    first = result[f"vllm_b{bench.plan.batches[0]}"]
    result["vllm_start_and_first_sync_s"] = round(first["first_call_s"] - first["warm_call_s"], 2)
    return result


# ---- targets --------------------------------------------------------------------------------------
def targets(bench: Bench) -> dict:
    """Issue 13's targets next to what was measured (None where a section failed or did not run)."""

    def read(section: str, *keys: str) -> float | None:
        value = bench.results.get(section)
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    big = max(bench.plan.batches)
    vllm, static = (
        read("rollouts", f"vllm_b{big}", "tokens_per_s"),
        read("rollouts", f"hf_static_b{big}", "tokens_per_s"),
    )
    at_least = {
        f"vllm_tokens_per_s_b{big}": (vllm, 15_000),
        f"vllm_over_hf_static_b{big}": (round(vllm / static, 2) if vllm and static else None, 3.0),
        "opsd_step_speedup_vllm_over_hf": (read("opsd_step", "speedup"), 10.0),
    }
    at_most = {
        "sync_s_lora_merged": (read("weight_sync", "lora_merged_s"), 1.0),
        "sync_s_full": (read("weight_sync", "full_s"), 1.0),
        "sync_s_adapter_only": (read("adapter_only", "sync_s"), 1.0),
    }
    rows = {
        name: {"measured": value, "target": f">= {goal:,}", "met": value is not None and value >= goal}
        for name, (value, goal) in at_least.items()
    }
    rows.update(
        {
            name: {"measured": value, "target": f"<= {goal}", "met": value is not None and value <= goal}
            for name, (value, goal) in at_most.items()
        }
    )
    return rows


SECTIONS: dict[str, Callable[[Bench], dict]] = {
    "rollouts": measure_rollouts,
    "weight_sync": measure_sync,
    "opsd_step": measure_opsd_step,
    "batched_step": measure_batched_step,
    "sleep_mode": measure_sleep_mode,
    "adapter_only": measure_adapter_only,
}


def setup_info(bench: Bench) -> dict:
    import transformers
    import vllm

    plan = bench.plan
    return {
        "device": torch.cuda.get_device_name() if plan.device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm": vllm.__version__,
        "params_b": round(sum(p.numel() for p in bench.model.parameters()) / 1e9, 4),
        "plan": {key: value for key, value in dataclasses.asdict(plan).items() if key != "dtype"},
        "dtype": str(plan.dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a Qwen3 tokenizer folder (required without --smoke)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_rollout.json")
    parser.add_argument("--smoke", action="store_true", help="every section on the CPU, tiny shapes, strict")
    parser.add_argument("--batches", type=int, nargs="+", help="rollout batch sizes (default: 64 256)")
    parser.add_argument("--new-tokens", type=int, help="per rollout and per OPSD step (default: 1024)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    if not args.smoke and args.tokenizer is None:
        parser.error("--tokenizer is required without --smoke (a Qwen3 tokenizer folder)")
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    plan = dataclasses.replace(
        plan, batches=tuple(args.batches or plan.batches), new_tokens=args.new_tokens or plan.new_tokens
    )
    start = time.perf_counter()
    bench = Bench(plan, args.tokenizer, args.out)
    bench.results["setup"] = setup_info(bench)
    for name in [name for name in SECTIONS if name in args.sections]:  # in order: each builds on the last
        bench.section(name, SECTIONS[name], strict=args.smoke)
    bench.results["targets"] = targets(bench)
    bench.results["total_s"] = round(time.perf_counter() - start, 1)
    bench.write()
    print(f"Written: {args.out} ({bench.results['total_s']} s)")


if __name__ == "__main__":
    main()
