"""Golden values of one training step, recorded before the refactor of `opsd_lightning.algorithms`.

For every combination the configs allow (algorithm x divergence x teacher x weighting x loss backend, the
hybrid's modes, and a few extras: micro-batches, gradient accumulation, two steps, ...), this composes the
real `conf/train.yaml` with Hydra, builds the training module as `opsd_lightning.cli.train.train` does, on a
tiny random Qwen3 in float64, and runs one optimizer step (two for `trainer.max_steps=2`) on one fixed batch
of the built-in arithmetic task through a real `lightning.Trainer`. The optimizer is plain SGD with lr 1 and
no clipping, so each parameter's update is minus its gradient; recorded per combination:

    loss            `train/loss` of the (last) step, what the module logs
    grad_norm       the global L2 norm of (params before - params after) of that step = the gradient's norm
    trained_tokens  `train/trained_tokens` of that step
    steps           for several steps, each step's {loss, grad_norm, trained_tokens}

or `rejected`: the message of the ValueError with which the pre-flight check or the module refuses it, or
`error`: the exception the training step raised (the current code crashes on that combination).

    .venv/bin/python tests/golden/record_step_values.py --out tests/golden/step_values.json
    .venv/bin/python tests/golden/record_step_values.py --only algorithm=sft --only teacher=ema --print
    .venv/bin/python tests/golden/record_step_values.py --list            # the keys, without running them

Everything runs in float64 on one CPU thread, so that the values depend neither on the thread count nor
on the CPU's SIMD kernels (checked with ATEN_CPU_CAPABILITY=default against AVX-512): the models are built
as the configs build them, then made float64 with their weights drawn again in float64 (`to_float64`: torch
draws float32 normals with kernel-specific SIMD code), `transformers`' Qwen3 RMSNorm and rotary angles
(float32 whatever the model's dtype) are computed in float64 for the run (`float64_model_internals`), and
`trainer.precision=64-true` makes float64 the default dtype inside the training step (the module sums its
step's loss in a tensor of the default dtype). What stays float32: the package's own `.float()` casts, on
purpose (`algorithms/groups.token_log_probs`, used by GRPO and the hybrid's policy term and RLSD's
weights, and SFT's log-softmax), and generation, which samples from float32 probabilities; see
`tests/test_golden_step_values.py` for the tolerances.

A random model never answers an arithmetic problem correctly, so with the real grader every GRPO group has
equal rewards and zero advantages: the policy term vanishes. Combinations marked `| rewards=parity` grade a
completion by the parity of its characters' code points instead (as `tests/training/test_hybrid.py` does), so
groups hold right and wrong rollouts; `| rewards=graded` keeps the real grader.

A combination's key is its Hydra overrides (on top of `BASE_OVERRIDES`, which the JSON stores too),
optionally followed by ` | ` and this harness's own options (`rewards=parity|graded`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF = REPO_ROOT / "conf"
DEFAULT_OUT = Path(__file__).with_name("step_values.json")

# What every combination shares. The model is the tests' tiny Qwen3 (hidden 32, 2 layers: conftest's
# `build_small_tiny`), randomly initialised (warmup=none); one batch of all 4 training rows; SGD with lr 1 and
# no momentum, weight decay, schedule or clipping, so that an update is exactly minus the gradient.
BASE_OVERRIDES = (
    "model=tiny",
    "warmup=none",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "data=arith",
    "data.train_size=4",
    "data.val_size=4",
    "data.batch_size=4",
    "seed=0",
    "context=default",
    "peft=none",
    "rollout=hf",
    "benchmark=heldout",
    "logger=none",
    "callbacks=none",
    "validate_before=false",
    "trainer=cpu",
    "trainer.max_steps=1",
    "trainer.precision=64-true",
    "algorithm.optimizer._target_=torch.optim.SGD",
    "algorithm.optimizer.lr=1.0",
    "algorithm.optimizer.weight_decay=0.0",
    "+algorithm.optimizer.momentum=0.0",
    "algorithm.scheduler=null",
    "algorithm.gradient_clip_val=null",
)
# Short rollouts, for the algorithms that sample (those whose config has `sampling`).
SAMPLING_OVERRIDES = ("algorithm.sampling.max_new_tokens=6", "algorithm.sampling.temperature=1.0")
# The hybrid's modes (algorithms/settings.py HYBRID_MODES), for the algorithms whose config has `mode`.
HYBRID_MODES = ("sum", "rlsd")
BACKENDS = ("chunked", "full_logits")
REWARDS = ("graded", "parity")
HARNESS_SEPARATOR = " | "
# After a refactor that renames or moves a config option, the recorded keys keep their old spelling: map an
# old override (exactly as in a key) to the override(s) that mean the same on the new configs, so that the
# same step is computed again.
OVERRIDE_TRANSLATIONS: dict[str, tuple[str, ...]] = {
    # Issue 19: one `teacher_context` group replaced `algorithm.reason_first`, both `privileged_context`
    # options and their sub-options; the keys keep the names the values were recorded under (code 7035ee5).
    "algorithm.reason_first=true": ("teacher_context=reason_first",),
    "algorithm.rationale_sampling.max_new_tokens=6": ("teacher_context.rationale_sampling.max_new_tokens=6",),
    "algorithm.privileged_context=own_rollout": ("teacher_context=own_rollout",),
    "algorithm.no_correct_rollout=reference": ("teacher_context.no_correct_rollout=reference",),
    "teacher.privileged_context=false": ("teacher_context=student",),
    # Issue 20: the tiny default's heads became 32 wide (2 heads, 1 KV head). `teacher=model` builds its
    # teacher from the tiny defaults, which had 16-wide heads (4 heads, 2 KV heads) when these were recorded.
    "teacher=model": ("teacher=model", "teacher.model.num_heads=4", "teacher.model.num_kv_heads=2"),
}


# ---- combinations --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Combination:
    """Hydra overrides (on top of the base ones) and this harness's options (`rewards`)."""

    overrides: tuple[str, ...]
    harness: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        key = " ".join(self.overrides)
        if self.harness:
            key += HARNESS_SEPARATOR + " ".join(f"{name}={value}" for name, value in self.harness)
        return key

    @classmethod
    def from_key(cls, key: str) -> Combination:
        overrides, _, harness = key.partition(HARNESS_SEPARATOR)
        options = tuple(tuple(item.split("=", 1)) for item in harness.split())
        return cls(tuple(overrides.split()), options)  # type: ignore[arg-type]

    @property
    def options(self) -> dict[str, str]:
        return dict(self.harness)

    @property
    def tokens(self) -> list[str]:
        """Every `name=value` of the key, overrides and harness options alike (for picking a subset)."""
        return [*self.overrides, *(f"{name}={value}" for name, value in self.harness)]


def options(group: str) -> list[str]:
    """The options of a config group: the stems of `conf/<group>/*.yaml`, sorted."""
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def algorithm_config(name: str) -> DictConfig:
    """`algorithm=<name>`'s own config (unresolved: `divergence: ${divergence}` says it takes one)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=[f"algorithm={name}"]).algorithm


@dataclass
class AlgorithmShape:
    """Which dimensions an algorithm's config has; the others it ignores, so they are not multiplied."""

    name: str
    samples: bool
    divergence: bool
    teacher: bool
    weighting: bool
    backend: bool
    mode: bool
    groups: bool  # GRPO-style groups graded by a reward

    @classmethod
    def of(cls, name: str) -> AlgorithmShape:
        config = algorithm_config(name)
        keys = set(config.keys())
        # Since issue 19 a recipe's terms take the divergence and the weighting (`terms: [{divergence: ..}]`).
        terms = [set(term.keys()) for term in config.get("terms") or []]
        return cls(
            name=name,
            samples="sampling" in keys,
            divergence="divergence" in keys or any("divergence" in term for term in terms),
            teacher="teacher" in keys,
            weighting="weighting" in keys or any("weighting" in term for term in terms),
            backend="loss" in keys and "backend" in config.loss,
            mode="mode" in keys,
            groups="group_size" in keys,
        )


@functools.cache
def algorithm_shape(name: str) -> AlgorithmShape:
    return AlgorithmShape.of(name)


def grid() -> list[Combination]:
    """Every combination of the options each algorithm takes, then a few extras (micro-batches, gradient
    accumulation, two steps, the real grader, and a few algorithm options), in a fixed order."""
    combinations: list[Combination] = []
    shapes = [algorithm_shape(name) for name in options("algorithm")]
    for shape in shapes:
        axes: list[list[str]] = [[f"algorithm={shape.name}"]]
        if shape.divergence:
            axes.append([f"divergence={d}" for d in options("divergence")])
        if shape.teacher:
            axes.append([f"teacher={t}" for t in options("teacher")])
        if shape.weighting:
            axes.append([f"weighting={w}" for w in options("weighting")])
        if shape.backend:
            axes.append([f"algorithm.loss.backend={b}" for b in BACKENDS])
        if shape.mode:
            axes.append([f"algorithm.mode={m}" for m in HYBRID_MODES])
        harness = (("rewards", "parity"),) if shape.groups else ()
        combinations += [Combination(tuple(choice), harness) for choice in itertools.product(*axes)]
    combinations += extras(shapes)
    keys = [c.key for c in combinations]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise AssertionError(f"combinations listed twice: {duplicates}")
    return combinations


def extras(shapes: Sequence[AlgorithmShape]) -> list[Combination]:
    """Beyond the product of the config groups: options that change how a step is computed."""
    teachers = options("teacher")

    def combo(*overrides: str, rewards: str | None = None) -> Combination:
        return Combination(tuple(overrides), (("rewards", rewards),) if rewards else ())

    opsd = ("algorithm=opsd", "divergence=jsd", "teacher=fixed", "weighting=none")
    opsd_b = ("algorithm=opsd", "divergence=forward_kl", "teacher=ema", "weighting=position")
    hybrid = ("algorithm=hybrid", "divergence=jsd", "teacher=fixed", "weighting=none")
    kl_fixed = ("algorithm=opsd", "divergence=forward_kl", "teacher=fixed", "weighting=none")
    chunked, full = "algorithm.loss.backend=chunked", "algorithm.loss.backend=full_logits"
    sum_mode, rlsd = "algorithm.mode=sum", "algorithm.mode=rlsd"
    micro = "algorithm.micro_batch_size=1"
    accumulate = ("algorithm.accumulate_grad_batches=2", "data.batch_size=2")
    two_steps = "trainer.max_steps=2"
    listed = [
        # Rows one at a time through forward/backward (the whole batch still generated at once).
        combo(*opsd, chunked, micro),
        combo(*opsd_b, full, micro),
        combo(*hybrid, chunked, sum_mode, micro, rewards="parity"),
        combo(*hybrid, full, rlsd, micro, rewards="parity"),
        # Two micro-batches of 2 rows per optimizer step: one token mean over both.
        combo(*opsd, chunked, *accumulate),
        combo(*opsd_b, full, *accumulate),
        combo(*hybrid, chunked, sum_mode, *accumulate, rewards="parity"),
        combo(*hybrid, full, rlsd, *accumulate, rewards="parity"),
        combo(*opsd, chunked, micro, *accumulate),
        # Two steps: the teachers, all equal to the initial weights in step 1, part ways in step 2.
        *(combo("algorithm=opsd", "divergence=jsd", f"teacher={t}", "weighting=none", chunked, two_steps)
          for t in teachers),
        *(combo("algorithm=hybrid", "divergence=forward_kl", f"teacher={t}", "weighting=none", full, sum_mode,
                two_steps, rewards="parity") for t in teachers),
        combo("algorithm=sft", two_steps),
        combo("algorithm=grpo", two_steps, rewards="parity"),
        # The real grader: every reward 0 on a random model (GRPO's step is then zero).
        combo("algorithm=grpo", rewards="graded"),
        combo(*hybrid, chunked, sum_mode, rewards="graded"),
        combo(*hybrid, chunked, rlsd, rewards="graded"),
        combo("algorithm=ssopd", *hybrid[1:], chunked, sum_mode, rewards="graded"),
        # Algorithm and divergence options that change the step.
        # (The KL to the initial weights has no gradient in step 1, where the policy is the initial one.)
        combo("algorithm=grpo", "algorithm.kl_coef=0.1", two_steps, rewards="parity"),
        combo(*opsd, chunked, "algorithm.reason_first=true", "algorithm.rationale_sampling.max_new_tokens=6"),
        combo(*opsd, chunked, "algorithm.mask_truncated=true"),
        combo(*opsd, full, "algorithm.diagnostics=false"),
        combo("algorithm=opsd", "divergence=jsd", "teacher=model", "weighting=none", chunked,
              "teacher.privileged_context=false"),
        combo(*kl_fixed, chunked, "divergence.clip=0.001", "divergence.clip_mode=entry"),
        combo(*kl_fixed, full, "divergence.clip=0.001", "divergence.clip_mode=token"),
        combo(*hybrid, chunked, sum_mode, "algorithm.privileged_context=own_rollout",
              "algorithm.no_correct_rollout=reference", rewards="parity"),
        combo(*hybrid, chunked, sum_mode, "algorithm.reward_weight=0.5", "algorithm.distill_weight=2.0",
              rewards="parity"),
    ]  # fmt: skip
    names = {shape.name for shape in shapes}
    return [c for c in listed if c.overrides[0].removeprefix("algorithm=") in names]


def select(combinations: Sequence[Combination], only: Sequence[str]) -> list[Combination]:
    """The combinations whose key contains every one of `only` (substrings such as `teacher=ema`)."""
    return [c for c in combinations if all(part in c.key for part in only)]


def covering_subset(keys: Sequence[str]) -> list[str]:
    """A small deterministic subset of `keys` in which every `name=value` of any key occurs at least once
    (every algorithm, divergence, teacher, weighting, backend, mode, extra option, and a rejected one when
    the rejected keys are among `keys`): greedily, the key adding the most values not yet seen, first in
    order on a tie."""
    remaining = list(keys)
    seen: set[str] = set()
    chosen: list[str] = []
    while True:
        gains = [len(set(Combination.from_key(k).tokens) - seen) for k in remaining]
        if not gains or max(gains) == 0:
            return chosen
        best = remaining.pop(gains.index(max(gains)))
        chosen.append(best)
        seen |= set(Combination.from_key(best).tokens)


# ---- running one combination ---------------------------------------------------------------------------
def compose_config(overrides: Sequence[str], output_dir: str) -> DictConfig:
    """`conf/train.yaml` with these overrides, as the Hydra app sees it (HydraConfig set, all resolved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            "train", overrides=[*overrides, f"hydra.run.dir={output_dir}"], return_hydra_config=True
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = output_dir
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = output_dir
    return cfg


def parity_grade(prediction: str | None, reference: str, *args: Any, **kwargs: Any) -> bool:
    """`rewards=parity`: right when the code points of the completion's text sum to an even number."""
    return prediction is not None and sum(map(ord, prediction)) % 2 == 0


def _identity_answer(text: str, *args: Any, **kwargs: Any) -> str:
    return text


@contextlib.contextmanager
def rewards(kind: str) -> Iterator[None]:
    """`parity`: the package's `extract_answer` returns the text itself and its `grade` is `parity_grade`, for
    the block; `graded`: nothing changed.

    The functions' code is swapped, not the names that point at them: every module that imported them by
    name, before the block or during it (a sampler built from the config), wherever they live after a
    refactor, calls the replacement, and nothing is left behind."""
    if kind not in REWARDS:
        raise ValueError(f"rewards={kind!r}: use one of {list(REWARDS)}")
    if kind == "graded":
        yield
        return
    import opsd_lightning.evaluation.grading  # noqa: F401 - where the grader lives (and what it imports)

    replacements = {"extract_answer": _identity_answer, "grade": parity_grade}
    found: dict[int, tuple[types.FunctionType, types.FunctionType]] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("opsd_lightning") or module is None:
            continue
        for attribute, replacement in replacements.items():
            function = getattr(module, attribute, None)
            if isinstance(function, types.FunctionType) and function.__module__.startswith("opsd_lightning"):
                found[id(function)] = (function, replacement)
    names = {function.__name__ for function, _ in found.values()}
    if names != set(replacements):
        raise AssertionError(
            f"rewards=parity found {sorted(names)} of {sorted(replacements)} in opsd_lightning"
        )
    saved = [(f, f.__code__, f.__defaults__, f.__kwdefaults__) for f, _ in found.values()]
    try:
        for function, replacement in found.values():
            function.__code__ = replacement.__code__
            function.__defaults__, function.__kwdefaults__ = None, None
        yield
    finally:
        for function, code, defaults, kwdefaults in saved:
            function.__code__, function.__defaults__, function.__kwdefaults__ = code, defaults, kwdefaults


def to_float64(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`model.double()`, with weights drawn again in float64 and a Qwen3's rotary frequencies computed again
    in float64.

    The weights: torch draws a float32 normal with SIMD code of its own per kernel set (AVX-512, AVX2, plain
    C++), so the same seed gives initial weights that differ by ~1e-7 relative across CPUs (measured with
    ATEN_CPU_CAPABILITY=default); a float64 draw takes the plain path on every CPU. Each matrix is drawn
    from N(0, initializer_range) as transformers initialises it, each RMSNorm weight is 1, in
    `named_parameters` order from one generator seeded with `seed`. The rotary frequencies: transformers
    computes them in float32 at init; their rounding, times positions in the hundreds, moves an angle by
    ~1e-5.
    """
    from transformers.models.qwen3 import modeling_qwen3 as qwen3

    model.double()
    norms = {id(m.weight) for m in model.modules() if isinstance(m, qwen3.Qwen3RMSNorm)}
    generator = torch.Generator().manual_seed(seed)
    std = float(model.config.initializer_range)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if id(param) in norms:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, dtype=torch.float64, generator=generator) * std)
    for module in model.modules():
        if isinstance(module, qwen3.Qwen3RotaryEmbedding):
            config = module.config
            if module.rope_type != "default":
                raise NotImplementedError(f"rope_type={module.rope_type}: only the default one is recomputed")
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            base = config.rope_parameters["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            module.inv_freq = inv_freq.to(module.inv_freq.device)
            module.original_inv_freq = inv_freq.clone().to(module.inv_freq.device)
    return model


@contextlib.contextmanager
def float64_model_internals() -> Iterator[None]:
    """transformers' Qwen3 computes its RMSNorm and its rotary angles in float32 whatever the model's dtype,
    so a float64 model is float32 at every norm, and its values depend on the CPU's float32 kernels (1e-7).
    For the block, the same formulas in the input's dtype. (Generation still samples from float32
    probabilities, and the package's own `.float()` casts stay: see the module docstring.)"""
    from transformers.models.qwen3 import modeling_qwen3 as qwen3

    def rms_norm(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def rotary(
        self: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(device=x.device, dtype=x.dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    patches = [(qwen3.Qwen3RMSNorm, "forward", rms_norm), (qwen3.Qwen3RotaryEmbedding, "forward", rotary)]
    originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in patches]
    try:
        for cls, name, replacement in patches:
            setattr(cls, name, replacement)
        yield
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)


class StepRecorder(L.Callback):
    """After every optimizer step: the logged loss and token count, and the norm of the parameter change."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._before: list[torch.Tensor] | None = None

    @staticmethod
    def _trainable(pl_module: L.LightningModule) -> list[torch.Tensor]:
        return [p for p in pl_module.model.parameters() if p.requires_grad]

    def _snapshot(self, pl_module: L.LightningModule) -> None:
        self._before = [p.detach().clone() for p in self._trainable(pl_module)]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tensors = [*pl_module.parameters(), *(b for b in pl_module.buffers() if b.is_floating_point())]
        not_double = sorted({str(t.dtype) for t in tensors} - {"torch.float64"})
        if not_double:  # the student, and a teacher's frozen copy, EMA shadow or separate model
            raise AssertionError(f"parameters in {not_double}: every weight must be float64")
        self._snapshot(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not pl_module.ended_optimizer_step:
            return
        assert self._before is not None
        after = self._trainable(pl_module)
        squares = sum(
            float(((b.double() - a.detach().double()) ** 2).sum())
            for b, a in zip(self._before, after, strict=True)
        )
        metrics = trainer.callback_metrics
        step: dict[str, Any] = {
            "loss": float(metrics["train/loss"]) if "train/loss" in metrics else None,
            "grad_norm": math.sqrt(squares),
            "trained_tokens": int(metrics["train/trained_tokens"])
            if "train/trained_tokens" in metrics
            else None,
        }
        if "train/nonfinite_steps" in metrics:
            step["nonfinite_steps"] = int(metrics["train/nonfinite_steps"])
        self.steps.append(step)
        self._snapshot(pl_module)


def rejection(err: Exception) -> str | None:
    """The message of a ValueError raised by the pre-flight check or the module (Hydra wraps the latter)."""
    if isinstance(err, ValueError):
        return str(err)
    if isinstance(err, InstantiationException) and isinstance(err.__cause__, ValueError):
        return str(err.__cause__)
    return None


def failure(err: BaseException) -> str:
    """`Type: first line of its message`, of an error the training step raised."""
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0] if message else ''}"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Lightning's banners and its known harmless warnings off, for the block only (a test session's other
    tests read these loggers)."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"lightning\..*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        try:
            for name in names:
                logging.getLogger(name).setLevel(logging.ERROR)
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def run_combination(
    combination: Combination,
    base: Sequence[str] = BASE_OVERRIDES,
    sampling: Sequence[str] = SAMPLING_OVERRIDES,
) -> dict[str, Any]:
    """Build and train one combination as `opsd_lightning.cli.train.train` does (minus evaluation and
    outputs); its recorded values, or `{"rejected": message}`, or `{"error": "Type: message"}`."""
    from opsd_lightning.cli.app import build_benchmarks, build_model, build_teacher, instantiate_datamodule
    from opsd_lightning.cli.checks import check_config
    from opsd_lightning.cli.train import connect_renderer
    from opsd_lightning.contexts.renderer import ContextRenderer
    from opsd_lightning.evaluation.loaders import WithBenchmarks
    from opsd_lightning.evaluation.runner import EvalSettings
    from opsd_lightning.models.lora import apply_peft

    algorithm = next(o.split("=", 1)[1] for o in combination.overrides if o.startswith("algorithm="))
    samples = algorithm_shape(algorithm).samples
    own = [new for old in combination.overrides for new in OVERRIDE_TRANSLATIONS.get(old, (old,))]
    overrides = [*base, *(sampling if samples else ()), *own]
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet())
        output_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="golden-"))
        cfg = compose_config(overrides, output_dir)
        stack.enter_context(rewards(combination.options.get("rewards", "graded")))
        stack.enter_context(float64_model_internals())
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        try:
            check_config(cfg)
            settings = EvalSettings(**OmegaConf.to_container(cfg.evaluation, resolve=True))
            data = WithBenchmarks(
                instantiate_datamodule(cfg.data), build_benchmarks(cfg), settings.problems_per_batch
            )
            data.setup("fit")
            loaded = build_model(cfg, data.datamodule)
            to_float64(loaded.model, seed=int(cfg.model.seed))
            teacher = build_teacher(cfg, data.datamodule, loaded)
            if teacher is not None:
                to_float64(teacher.model, seed=int(cfg.teacher.model.get("seed", cfg.seed)) + 1)
            loaded.model = apply_peft(loaded.model, cfg.get("peft"))
            contexts = ContextRenderer(loaded.tokenizer, **cfg.context)
            connect_renderer(data.datamodule, contexts)
            module = instantiate(
                cfg.algorithm,
                model=loaded.model,
                tokenizer=loaded.tokenizer,
                contexts=contexts,
                benchmarks=data.names,
                _convert_="all",
                **({"teacher": teacher} if teacher is not None else {}),
            )
            module.engine.check_model(module.model)
        except (ValueError, InstantiationException) as err:
            message = rejection(err)
            if message is None:
                raise
            return {"rejected": message}
        recorder = StepRecorder()
        trainer: L.Trainer = instantiate(
            cfg.trainer,
            logger=False,
            callbacks=[recorder],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        try:
            trainer.fit(module, datamodule=data)
        except Exception as err:  # noqa: BLE001 - a combination the current code crashes on is recorded as such
            return {"error": failure(err)}
    if not recorder.steps or trainer.global_step != cfg.trainer.max_steps:
        raise AssertionError(
            f"{combination.key}: {trainer.global_step} optimizer steps, {len(recorder.steps)} recorded"
        )
    result = dict(recorder.steps[-1])
    if len(recorder.steps) > 1:
        result["steps"] = recorder.steps
    return result


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: the values do not depend on how reductions are split, and on a busy 2-core
    machine a tiny float64 matmul takes 0.1 ms instead of 16 ms (threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "conf"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (with uncommitted changes in src/ or conf/)" if dirty else "")


def record(combinations: Sequence[Combination], verbose: bool = True) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    with one_thread():
        for index, combination in enumerate(combinations, 1):
            start = time.perf_counter()
            results[combination.key] = run_combination(combination)
            if verbose:
                print(
                    f"[{index}/{len(combinations)}] {time.perf_counter() - start:5.2f} s  {combination.key}: "
                    f"{json.dumps(results[combination.key])[:160]}",
                    flush=True,
                )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"write the JSON here (e.g. {DEFAULT_OUT})")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the combinations whose key contains TEXT (repeatable: all must match), "
        "e.g. --only algorithm=hybrid --only teacher=ema",
    )
    parser.add_argument("--subset", action="store_true", help="only the fast test's covering subset")
    parser.add_argument(
        "--commit",
        default=None,
        help="the commit to name in recorded_with (default: this checkout's HEAD, from git), e.g. when "
        "recording from a `git archive` export of a commit while the work tree is being changed",
    )
    parser.add_argument("--list", action="store_true", help="list the selected combinations and exit")
    parser.add_argument("--print", action="store_true", help="print the JSON to stdout")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add the selected combinations to the existing --out file, keeping its other ones and its "
        "base overrides (to record combinations that new config options bring, without touching the old)",
    )
    args = parser.parse_args(argv)
    combinations = select(grid(), args.only)
    if args.subset:
        keep = set(covering_subset([c.key for c in combinations]))
        combinations = [c for c in combinations if c.key in keep]
    if args.list:
        print("\n".join(c.key for c in combinations))
        print(f"{len(combinations)} combinations", file=sys.stderr)
        return 0
    previous: dict[str, Any] | None = None
    if args.merge:
        if args.out is None or not args.out.is_file():
            parser.error("--merge needs an existing --out file")
        previous = json.loads(args.out.read_text())
        if previous["base_overrides"] != list(BASE_OVERRIDES) or previous["sampling_overrides"] != list(
            SAMPLING_OVERRIDES
        ):
            parser.error(f"{args.out} was recorded with other base or sampling overrides: record it whole")
    start = time.perf_counter()
    results = record(combinations)
    seconds = time.perf_counter() - start
    if previous is not None:
        merged = {**previous["combinations"], **results}
        previous["combinations"] = {c.key: merged[c.key] for c in grid() if c.key in merged} | merged
        previous.setdefault("merged", []).append(
            {"git_commit": args.commit or git_commit(), "keys": list(results)}
        )
        args.out.write_text(json.dumps(previous, indent=1) + "\n")
        print(f"{len(results)} combinations merged into {args.out}", file=sys.stderr)
        return 0
    document = {
        "recorded_with": {
            "git_commit": args.commit or git_commit(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "seconds": round(seconds, 1),
        },
        "base_overrides": list(BASE_OVERRIDES),
        "sampling_overrides": list(SAMPLING_OVERRIDES),
        "combinations": results,
    }
    text = json.dumps(document, indent=1) + "\n"
    if args.out is not None:
        args.out.write_text(text)
    if args.print or args.out is None:
        print(text)
    rejected = sum("rejected" in r for r in results.values())
    failed = sum("error" in r for r in results.values())
    print(
        f"{len(results)} combinations ({len(results) - rejected - failed} recorded, {rejected} rejected, "
        f"{failed} failed) in {seconds:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
