"""The rollout engine interface: every generation the project does (training rollouts, GRPO groups,
benchmark evaluation in training and in `opsd-eval`) goes through one, chosen by the `rollout` config group.

Ids in, ids out: prompts are the chat template's token ids (left-padded `TokenBatch`), completions come back
as ids in a `Rollout`; nothing is decoded and re-encoded. An engine that keeps its own copy of the weights
(vLLM) is told when the model's weights change and copies them in before its next generation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from opsd_lightning.contexts.batches import TokenBatch
from opsd_lightning.rollout.core import Rollout, SamplingConfig


class RolloutEngine(ABC):
    """Generates one completion per prompt row from `model`'s current weights."""

    # Seconds the latest copy of the weights into the engine took; None for an engine that reads the model.
    last_sync_seconds: float | None = None

    def check_model(self, model: torch.nn.Module) -> None:  # noqa: B027 - most engines run any model
        """Raise, naming the way out, if this engine cannot generate from `model` (before any training)."""

    @abstractmethod
    def generate(
        self,
        model: torch.nn.Module,
        prompt: TokenBatch,
        sampling: SamplingConfig,
        eos_ids: Sequence[int],
        pad_id: int,
        seed: int | None = None,
    ) -> Rollout:
        """Sample (or, at temperature 0, decode greedily) one completion per row; the same `seed` gives the
        same completions."""

    def weights_changed(self) -> None:  # noqa: B027 - engines that read the live model need nothing
        """The model's weights changed (an optimizer step, a loaded checkpoint): the next `generate` must see
        them."""
