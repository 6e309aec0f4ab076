"""Rollouts with Hugging Face `generate`: the default engine, and the one that needs nothing but the model."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch

from opsd_lightning.contexts.batches import TokenBatch
from opsd_lightning.rollout.core import Rollout, SamplingConfig, completion_mask_from_ids
from opsd_lightning.rollout.engine import RolloutEngine


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Generation runs without dropout; whatever mode the model was in comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """A private RNG stream for sampling, so a rollout depends on (seed, step) and not on history."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate_rollouts(
    model: torch.nn.Module,
    prompt: TokenBatch,
    sampling: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    seed: int | None = None,
) -> Rollout:
    """Sample one completion per prompt with `model.generate`; ids stay on the model's device."""
    device = prompt.input_ids.device
    start = time.perf_counter()
    with eval_mode(model), seeded(seed, device):
        output = model.generate(
            input_ids=prompt.input_ids,
            attention_mask=prompt.attention_mask,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=list(eos_ids),
            pad_token_id=pad_id,
            **sampling.generate_kwargs(),
        )
    completion_ids = output[:, prompt.input_ids.shape[1] :]
    completion_mask, truncated = completion_mask_from_ids(completion_ids, eos_ids)
    # A sequence that hit the budget exactly on its EOS is complete; only EOS-less rows are truncated.
    completion_ids = completion_ids.masked_fill(~completion_mask, pad_id)
    return Rollout(completion_ids, completion_mask, truncated, seconds=time.perf_counter() - start)


class HFEngine(RolloutEngine):
    """`rollout=hf`: `model.generate` on the live model; it reads the weights directly, so nothing to sync."""

    def generate(
        self,
        model: torch.nn.Module,
        prompt: TokenBatch,
        sampling: SamplingConfig,
        eos_ids: Sequence[int],
        pad_id: int,
        seed: int | None = None,
    ) -> Rollout:
        return generate_rollouts(model, prompt, sampling, eos_ids, pad_id, seed)
