"""The rollout engine's lifecycle during fit, in one place: when the engine's copy of the weights goes stale.

An engine that keeps its own copy of the weights (vLLM) copies them in before its next generation once it has
been told they changed (`RolloutEngine.weights_changed`). They change:
- after every optimizer step (`trainer.global_step` moved; a skipped non-finite step changes nothing), and
- when a checkpoint's weights replace the model's (resume, requeue).

The training module installs this callback itself (`OnPolicyModule.configure_callbacks`), so no trainer or
callbacks config can leave it out and let a run train on stale rollouts.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from opsd_lightning.rollout.engine import RolloutEngine


class EngineLifecycle(L.Callback):
    """Tells `engine` when the weights it generates from have changed."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self._seen_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self._seen_step:  # on-policy: the next rollout must see these weights
            self._seen_step = trainer.global_step
            self.engine.weights_changed()

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.engine.weights_changed()
