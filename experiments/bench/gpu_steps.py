"""`gpu_rollout.py`'s OPSD-step sections: one step of the real path, the batched step against the old
accumulation, and sleep mode's wake / sync / sleep cycle. Each `measure_*` takes the script's `Bench`."""

from __future__ import annotations

import functools
import os
import resource
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from gpu_opsd_step import Timing
from torch.utils.data import DataLoader

from opsd_lightning.data.arith import generate_examples
from opsd_lightning.data.datamodule import collate_raw_text
from opsd_lightning.objectives import Distill, ForwardKL
from opsd_lightning.rollout import HFEngine, Rollout, RolloutEngine, SamplingConfig, VLLMEngine
from opsd_lightning.rollout.samplers import SingleSampler
from opsd_lightning.teachers.modes import FixedTeacher
from opsd_lightning.training.module import OnPolicyModule

if TYPE_CHECKING:
    from gpu_rollout import Bench

SAMPLING = {"temperature": 1.1, "top_p": 0.95, "top_k": 20}  # the Qwen3 OPSD recipe's


class TimedEngine(RolloutEngine):
    """Wraps an engine and splits each call into weight-sync and generation seconds (a vLLM engine syncs
    here, timed, when the weights changed; an engine without `sync` reads the live model)."""

    def __init__(self, inner: RolloutEngine, bench: Bench) -> None:
        self.inner, self.bench = inner, bench
        self.calls: list[dict] = []
        self._changed = True  # whatever the engine holds, the first step syncs (timed)

    def generate(self, model, prompt, sampling, eos_ids, pad_id, seed=None) -> Rollout:
        sync_s = 0.0
        if self._changed and getattr(self.inner, "llm", None) is not None:
            sync_s = self.bench.timed(lambda: self.inner.sync(model))[0]
        self._changed = False
        seconds, rollout = self.bench.timed(
            lambda: self.inner.generate(model, prompt, sampling, eos_ids, pad_id, seed)
        )
        self.calls.append({"generate_s": seconds, "sync_s": sync_s, "tokens": rollout.num_tokens})
        return rollout

    def weights_changed(self) -> None:
        self._changed = True
        self.inner.weights_changed()


def memory_gib(device: str) -> tuple[float, float]:
    """(now, peak). CUDA: memory PyTorch allocated, vLLM's share included once an engine exists (peak since
    the last reset); CPU: the process's resident memory (peak over its whole life)."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**30, peak_kib / 2**20


def trainer(bench: Bench, timing: L.Callback) -> L.Trainer:
    plan = bench.plan
    return L.Trainer(
        accelerator="cpu" if plan.device == "cpu" else "gpu",
        devices=1,
        precision=plan.precision,
        max_steps=plan.steps,  # optimizer steps
        logger=False,
        callbacks=[timing],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tempfile.mkdtemp(prefix="gpu_rollout_"),
    )


def opsd_steps(
    bench: Bench, inner: RolloutEngine, batch: int, accumulate: int = 1, micro_batch_size: int | None = None
) -> dict:
    """`plan.steps` optimizer steps of OPSD as gpu_opsd_step.py runs them, on data batches of `batch` prompts
    (one generate each), `accumulate` of them per optimizer step, `micro_batch_size` rows per backward. Each
    optimizer step is split into generate, sync and train (the rest: teacher and student forward,
    backward, optimizer) seconds."""
    plan, engine, timing = bench.plan, TimedEngine(inner, bench), Timing()
    distill = Distill(
        ForwardKL(temperature=SAMPLING["temperature"]), loss={"backend": "chunked", "chunk_size": 1024}
    )
    module = OnPolicyModule(  # OPSD's parts: the distill term on single rollouts, the reference context
        model=bench.lora_model(),
        tokenizer=bench.tokenizer,
        contexts=bench.renderer,
        optimizer=functools.partial(torch.optim.AdamW, lr=2e-4),
        terms=[distill],
        sampler=SingleSampler(),
        teacher=FixedTeacher(),
        sampling={**SAMPLING, "max_new_tokens": plan.new_tokens},
        engine=engine,
        accumulate_grad_batches=accumulate,
        micro_batch_size=micro_batch_size,
    )
    rows = generate_examples(batch * accumulate * plan.steps, seed=1, max_start=30, max_change=20)
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    at_start_gib = memory_gib(plan.device)[0]
    trainer(bench, timing).fit(module, DataLoader(rows, batch_size=batch, collate_fn=collate_raw_text))
    bench.model.to(plan.device)  # Lightning moves the module to the CPU when fit ends
    batches = [{**call, "step_s": s} for call, s in zip(engine.calls, timing.steps, strict=True)]
    steps, summed = [], ("generate_s", "sync_s", "tokens", "step_s")
    for start in range(0, len(batches), accumulate):  # the data batches of one optimizer step
        window = batches[start : start + accumulate]
        step = {key: sum(part[key] for part in window) for key in summed}
        step["train_s"] = step["step_s"] - step["generate_s"] - step["sync_s"]
        steps.append({**step, "generate_calls": len(window)})
    rounded = [{key: round(value, 3) for key, value in step.items()} for step in steps]
    return {
        "last_step": rounded[-1],
        "steps": rounded,
        "memory_at_start_gib": round(at_start_gib, 2),
        "peak_memory_gib": round(memory_gib(plan.device)[1], 2),
    }


def measure_opsd_step(bench: Bench) -> dict:
    """One data batch of `plan.step_prompts` prompts per optimizer step, generated and trained at once."""
    plan = bench.plan
    result = {"prompts": plan.step_prompts, "new_tokens": plan.new_tokens}
    result["hf"] = opsd_steps(bench, HFEngine(), plan.step_prompts)
    bench.free_memory()
    result["vllm"] = opsd_steps(bench, bench.vllm, plan.step_prompts)
    result["speedup"] = round(result["hf"]["last_step"]["step_s"] / result["vllm"]["last_step"]["step_s"], 2)
    return result


# ---- the batched step -------------------------------------------------------------------------------
def measure_batched_step(bench: Bench) -> dict:
    """The recipes' step (`conf/experiment/qwen3_recipe.yaml`): all `rows x micro_batches` prompts of an
    optimizer step generated in one call, trained `rows` at a time (accumulate_grad_batches=1,
    micro_batch_size=rows), against the old way: one generate per data batch of `rows` prompts, accumulated
    over `micro_batches` of them. The backward work is the same; only the generate calls differ."""
    rows, micro_batches = bench.plan.window
    result: dict = {"prompts_per_step": rows * micro_batches, "micro_batch_size": rows}
    result["new_tokens"] = bench.plan.new_tokens
    for name, engine in (("hf", HFEngine), ("vllm", lambda: bench.vllm)):
        batched = opsd_steps(bench, engine(), rows * micro_batches, 1, rows)
        bench.free_memory()
        accumulated = opsd_steps(bench, engine(), rows, micro_batches)
        bench.free_memory()
        one, many = batched["last_step"], accumulated["last_step"]
        result[name] = {
            "batched": {**one, "peak_memory_gib": batched["peak_memory_gib"]},
            "accumulated": {**many, "peak_memory_gib": accumulated["peak_memory_gib"]},
            # accumulated over batched: > 1 where one call is faster
            "generate_speedup": round(many["generate_s"] / one["generate_s"], 2),
            "step_speedup": round(many["step_s"] / one["step_s"], 2),
            # batched over accumulated: ~1, the same rows per backward
            "train_ratio": round(one["train_s"] / many["train_s"], 2),
        }
    return result


# ---- sleep mode -------------------------------------------------------------------------------------
def free_gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / 2**30


class PhaseClock:
    """Times the calls a sleep-mode `VLLMEngine.generate` makes (`_awake`: wake the weights, sync, wake the
    KV cache, generate, sleep) by wrapping the engine's real ones, and reads the GPU's free memory just
    before and after each sleep."""

    def __init__(self, bench: Bench, engine: VLLMEngine) -> None:
        self.bench, self.phases = bench, {}
        llm = engine.llm
        self._wrap(llm, "wake_up", lambda tags=None: "wake_" + "_".join(tags or ["all"]))
        self._wrap(llm, "generate", lambda *args, **kwargs: "generate")
        self._wrap(engine, "sync", lambda model: "sync")
        sleep = llm.sleep

        def timed_sleep(level: int = 1) -> None:
            self.phases["free_gib_awake"] = free_gib()
            self.phases["sleep"] = bench.timed(lambda: sleep(level=level))[0]
            self.phases["free_gib_asleep"] = free_gib()

        llm.sleep = timed_sleep

    def _wrap(self, owner: object, method: str, name_of: Callable[..., str]) -> None:
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            seconds, value = self.bench.timed(lambda: original(*args, **kwargs))
            self.phases[name_of(*args, **kwargs)] = seconds
            return value

        setattr(owner, method, timed)


def sleep_cycles(bench: Bench, engine: VLLMEngine, clock: PhaseClock, level: int) -> list[dict]:
    """`plan.steps` generations at sleep `level`, the weights changed before each as after an optimizer
    step; the first after a change of level is left out (it wakes from the other level's sleep)."""
    engine.sleep_level = level
    prompt = bench.prompts(bench.plan.step_prompts)
    sampling = SamplingConfig(**SAMPLING, max_new_tokens=bench.plan.new_tokens)
    cycles = []
    for _ in range(bench.plan.steps + 1):
        engine.weights_changed()
        clock.phases = {}
        seconds, rollout = bench.timed(lambda: bench.generate(engine, prompt, sampling))
        cycles.append({**clock.phases, "generate_call_s": seconds, "tokens": rollout.num_tokens})
    return cycles[1:]


def measure_sleep_mode(bench: Bench) -> dict:
    """One engine with sleep mode, at level 2 then level 1 (vLLM's sleep allocator is one per process: a
    second sleep-mode engine would be woken and put to sleep with the first). Per generation: seconds of
    each phase, and the free GPU memory awake and asleep. On a CPU `VLLMEngine` refuses sleep mode (vLLM's
    CPU backend has none): the section records that it was skipped, and why."""
    plan = bench.plan
    try:
        engine = VLLMEngine(**{**plan.engine, **plan.sleep_engine}, sleep_mode=True, sleep_level=2)
    except ValueError as error:
        if plan.device == "cuda":
            raise
        return {"skipped": str(error)}
    bench.lora_model()  # as in training: LoRA merged by each sync
    free_before_start = free_gib()
    prompt = bench.prompts(plan.step_prompts)
    first = SamplingConfig(temperature=0.0, max_new_tokens=1)
    start_s = bench.timed(lambda: bench.generate(engine, prompt, first))[0]
    clock = PhaseClock(bench, engine)
    result: dict = {"prompts": plan.step_prompts, "new_tokens": plan.new_tokens}
    result["engine_start_and_first_call_s"] = round(start_s, 1)
    for level in (2, 1):
        cycles = sleep_cycles(bench, engine, clock, level)
        phases = {key: statistics.median(cycle[key] for cycle in cycles) for key in cycles[-1]}
        # wake the weights + sync + wake the KV cache + sleep: what sleep mode adds to a generation
        phases["overhead_s"] = sum(phases[key] for key in phases if key.startswith(("wake", "sync", "sleep")))
        phases["cycle_s"] = phases["overhead_s"] + phases["generate"]
        phases["freed_gib"] = phases["free_gib_asleep"] - phases["free_gib_awake"]
        # what the sleeping engine still holds (CUDA graphs, buffers outside the sleep allocator)
        phases["held_asleep_gib"] = free_before_start - phases["free_gib_asleep"]
        result[f"level_{level}"] = {key: round(value, 3) for key, value in phases.items()}
    return result
