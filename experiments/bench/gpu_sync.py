"""`gpu_rollout.py`'s weight-sync sections: the engine's sync (full weights, LoRA merged on the fly) and
vLLM's own adapter-only LoRA in a second engine. Each `measure_*` takes the script's `Bench`."""

from __future__ import annotations

import copy
import functools
import os
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gpu_opsd_step import LORA
from gpu_steps import SAMPLING
from transformers import Qwen3ForCausalLM

from opsd_lightning.rollout import SamplingConfig
from opsd_lightning.rollout.vllm import prompt_token_lists

if TYPE_CHECKING:
    from gpu_rollout import Bench


def sync_times(bench: Bench) -> list[float]:
    """Seconds of `VLLMEngine.sync` (the engine started first, outside the timing)."""
    if bench.vllm.llm is None:
        bench.generate(bench.vllm, bench.prompts(1), SamplingConfig(temperature=0.0, max_new_tokens=1))
    return [bench.timed(lambda: bench.vllm.sync(bench.model))[0] for _ in range(bench.plan.sync_repeats)]


def measure_sync(bench: Bench) -> dict:
    """Full weights (the bare model), then LoRA merged on the fly (the same model with adapters)."""
    full = sync_times(bench)
    bench.lora_model()
    merged = sync_times(bench)
    return {
        "full_s": round(statistics.median(full), 3),
        "lora_merged_s": round(statistics.median(merged), 3),
        "lora_rank": LORA["r"],
        "repeats": bench.plan.sync_repeats,
    }


def start_adapter_engine(bench: Bench, folder: Path):
    """A second engine, with vLLM's LoRA support, from the base model's config (dummy weights: the adapter's
    load time does not depend on them)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    config = copy.deepcopy(bench.lora_model().get_base_model().config)
    config.architectures = [Qwen3ForCausalLM.__name__]  # what vLLM builds (else it guesses a pooling model)
    config.save_pretrained(folder)
    plan = bench.plan
    return LLM(
        model=str(folder),
        load_format="dummy",
        dtype=str(plan.dtype).removeprefix("torch."),
        skip_tokenizer_init=True,
        generation_config="vllm",
        enable_lora=True,
        max_lora_rank=LORA["r"],
        max_loras=1,
        max_num_seqs=plan.engine["max_num_seqs"],
        max_model_len=plan.engine["max_model_len"],
        **plan.adapter_engine,
        enforce_eager=plan.engine.get("enforce_eager", False),
        seed=0,
    )


def measure_adapter_only(bench: Bench) -> dict:
    """vLLM's own LoRA instead of merged weights: a sync saves the adapter and loads it into the engine
    under a new id (what each optimizer step would do); then its decode speed with the adapter active."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    folder = Path(tempfile.mkdtemp(prefix="gpu_rollout_"))
    start_s, llm = bench.timed(lambda: start_adapter_engine(bench, folder / "base"))
    saves, loads = [], []
    for step in range(1, bench.plan.sync_repeats + 1):
        adapter = folder / f"adapter-{step}"
        saves.append(bench.timed(functools.partial(bench.model.save_pretrained, adapter))[0])
        request = LoRARequest(f"step-{step}", step, str(adapter))
        loads.append(bench.timed(functools.partial(llm.llm_engine.add_lora, request))[0])
        if step > 1:
            llm.llm_engine.remove_lora(step - 1)
    batch = bench.plan.batches[0]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_lists(bench.prompts(batch))]
    params = SamplingParams(
        **SAMPLING, max_tokens=bench.plan.new_tokens, stop_token_ids=bench.eos_ids, seed=0
    )
    generate = functools.partial(llm.generate, prompts, params, lora_request=request, use_tqdm=False)
    generate()  # the adapter's first use warms up
    seconds, outputs = bench.timed(generate)
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {
        "sync_s": round(statistics.median(save + load for save, load in zip(saves, loads, strict=True)), 3),
        "save_adapter_s": round(statistics.median(saves), 3),
        "load_adapter_s": round(statistics.median(loads), 3),
        "engine_start_s": round(start_s, 1),
        f"tokens_per_s_b{batch}_adapter_active": round(tokens / seconds, 1),
    }
