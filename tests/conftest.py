"""Shared fixtures: a tiny random Qwen3 + tokenizer built locally (no downloads), and ../shared paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests draw the same examples on every run, so CI cannot fail on a new random draw;
# `HYPOTHESIS_PROFILE=explore make test` searches fresh examples.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a clean skip when this checkout has none (a user's fresh clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only in the developers' and CI checkouts)")
    return path


@pytest.fixture(scope="session")
def tiny():
    """A tiny random Qwen3 with the locally built tokenizer (session-wide; tests must not train it)."""
    from opsd_lightning.models import build_tiny

    torch.manual_seed(0)
    return build_tiny(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)


# A tiny Qwen3 with 32-wide heads (64 / 2), the smallest vLLM's CPU attention takes: the vLLM tests' model.
VLLM_TINY_SHAPE = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "intermediate_size": 128,
}


def build_small_tiny():
    """The tests' tiny random Qwen3 (hidden 32, 2 layers) with the locally built tokenizer, seed 0."""
    from opsd_lightning.models import build_tiny

    return build_tiny(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)


@pytest.fixture()
def fresh_tiny():
    """A new tiny model per test, for tests that train."""
    return build_small_tiny()


def opsd_module(
    loaded,
    divergence=None,
    weighting=None,
    loss=None,
    diagnostics: bool = True,
    mask_truncated: bool = False,
    **overrides,
):
    """An `OnPolicyModule` with OPSD's parts (`conf/algorithm/opsd.yaml`: [Distill] on single rollouts, the
    reference context) on `loaded` (model + tokenizer), with the tests' defaults: forward KL, the fixed
    teacher,
    SGD, 6 sampled tokens per rollout. The distill term's options are arguments; any module argument
    (`teacher`, `teacher_context`, `micro_batch_size`, ...) can be overridden."""
    from opsd_lightning.objectives import Distill, ForwardKL
    from opsd_lightning.rollout.samplers import SingleSampler

    distill = Distill(divergence or ForwardKL(), weighting, loss, diagnostics)
    return policy_module(loaded, [distill], SingleSampler(mask_truncated), **overrides)


def policy_module(loaded, terms, sampler, **overrides):
    """An `OnPolicyModule` of these terms and sampler on `loaded`, with the tests' defaults (the fixed
    teacher,
    SGD, 6 sampled tokens, greedy 6-token evaluation)."""
    import functools

    from opsd_lightning.contexts.renderer import ContextRenderer
    from opsd_lightning.teachers.modes import FixedTeacher
    from opsd_lightning.training.module import OnPolicyModule

    settings = {
        "optimizer": functools.partial(torch.optim.SGD, lr=0.1),
        "teacher": FixedTeacher(),
        "sampling": {"temperature": 1.0, "max_new_tokens": 6},
    }
    return OnPolicyModule(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        contexts=ContextRenderer(loaded.tokenizer),
        terms=terms,
        sampler=sampler,
        **{**settings, **overrides},
    )


def distill_sum(module, student_prompt, teacher_prompt, completion_ids, completion_mask, loss_mask):
    """The module's Distill term summed over `loss_mask`'s tokens of these rows (student grad only)."""
    from opsd_lightning.objectives import Distill, TermInputs
    from opsd_lightning.rollout.episodes import Episodes

    (distill,) = [term for term in module.terms if isinstance(term, Distill)]
    rows = len(completion_ids)
    episodes = Episodes(
        student_prompt,
        completion_ids,
        completion_mask,
        loss_mask,
        torch.zeros(rows, dtype=torch.bool),
        problems=[""] * rows,
        solutions=[None] * rows,
        answers=[None] * rows,
    )
    inputs = TermInputs(
        module.model, episodes, module.teacher, teacher_prompt, torch.ones(rows, dtype=torch.bool)
    )
    return distill(inputs)


def sample(module, prompt, seed=0):
    """One rollout of `prompt` from the module's model through its engine, with its training sampling."""
    return module.engine.generate(
        module.model, prompt, module.sampling, module.eos_ids, module.tokenizer.pad_token_id, seed
    )


def quiet_trainer(root, **overrides):
    """A CPU `Trainer` for tests: no logger, checkpoints, progress bar, summary or validation."""
    import lightning as L

    settings = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": root,
    }
    return L.Trainer(**{**settings, **overrides})
