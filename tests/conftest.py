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


def build_small_tiny():
    """The tests' tiny random Qwen3 (hidden 32, 2 layers) with the locally built tokenizer, seed 0."""
    from opsd_lightning.models import build_tiny

    return build_tiny(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)


@pytest.fixture()
def fresh_tiny():
    """A new tiny model per test, for tests that train."""
    return build_small_tiny()


def opsd_module(loaded, **overrides):
    """An `OPSDModule` on `loaded` (model + tokenizer) with the tests' defaults: forward KL, the fixed
    teacher, SGD, 6 sampled tokens per rollout; any argument can be overridden."""
    import functools

    from opsd_lightning.algorithms import OPSDModule
    from opsd_lightning.contexts import ContextRenderer
    from opsd_lightning.losses import ForwardKL
    from opsd_lightning.teachers import FixedTeacher

    settings = {
        "optimizer": functools.partial(torch.optim.SGD, lr=0.1),
        "divergence": ForwardKL(),
        "teacher": FixedTeacher(),
        "sampling": {"temperature": 1.0, "max_new_tokens": 6},
    }
    return OPSDModule(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        contexts=ContextRenderer(loaded.tokenizer),
        **{**settings, **overrides},
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
