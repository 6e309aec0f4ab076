"""The engine's lifecycle during fit (`rollout/lifecycle.py`): the engine learns that its weights are stale
after every optimizer step, not after every micro-batch, and when a checkpoint's weights replace the model's;
the module installs the callback itself, so a trainer without it still syncs."""

from __future__ import annotations

import lightning as L
import torch

from opsd_lightning.data.arith import ArithDataModule
from opsd_lightning.rollout import HFEngine
from opsd_lightning.rollout.lifecycle import EngineLifecycle
from tests.conftest import opsd_module, quiet_trainer


class RecordingEngine(HFEngine):
    """HF generation that records, per `generate`, how many stale-weights notices came before it."""

    def __init__(self) -> None:
        self.notices = 0
        self.notices_at_generate: list[int] = []

    def generate(self, *args, **kwargs):
        self.notices_at_generate.append(self.notices)
        return super().generate(*args, **kwargs)

    def weights_changed(self) -> None:
        self.notices += 1


def fit(module, root, steps, **trainer_options) -> L.Trainer:
    trainer = quiet_trainer(root, max_steps=steps, **trainer_options)
    trainer.fit(module, datamodule=ArithDataModule(train_size=16, val_size=4, batch_size=2, seed=0))
    return trainer


def test_the_engine_hears_once_per_optimizer_step_before_the_next_rollout(fresh_tiny, tmp_path):
    engine = RecordingEngine()
    module = opsd_module(fresh_tiny, engine=engine, accumulate_grad_batches=2)
    trainer = fit(module, tmp_path, steps=3)
    assert not any(isinstance(c, EngineLifecycle) for c in quiet_trainer(tmp_path).callbacks)
    assert trainer.global_step == 3
    assert engine.notices == 3  # one per optimizer step, none per micro-batch
    # 2 micro-batches per step, each generating once: the second step's rollouts come after the first notice
    assert engine.notices_at_generate == [0, 0, 1, 1, 2, 2]


def test_a_loaded_checkpoint_makes_the_engine_stale(fresh_tiny, tmp_path):
    first = opsd_module(fresh_tiny, engine=RecordingEngine())
    fit(first, tmp_path / "first", steps=1)
    checkpoint = tmp_path / "one_step.ckpt"
    first.trainer.save_checkpoint(checkpoint)
    engine = RecordingEngine()
    resumed = opsd_module(fresh_tiny, engine=engine)
    trainer = quiet_trainer(tmp_path / "resumed", max_steps=2)
    data = ArithDataModule(train_size=16, val_size=4, batch_size=2, seed=0)
    trainer.fit(resumed, datamodule=data, ckpt_path=str(checkpoint))
    assert engine.notices_at_generate[0] == 1  # the checkpoint's weights reach the first rollout
    assert engine.notices == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_validate_then_fit_on_one_trainer_attaches_the_callback_once(fresh_tiny, tmp_path, caplog):
    """`opsd-train` validates the base, then fits, on one trainer: the callback is attached once (no
    "will override existing callbacks" notice in the run's output) and still tells the engine."""
    engine = RecordingEngine()
    module = opsd_module(fresh_tiny, engine=engine, evaluation={"sampling": {"max_new_tokens": 2}})
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    data = ArithDataModule(train_size=16, val_size=4, batch_size=2, seed=0)
    with caplog.at_level("INFO"):
        trainer.validate(module, datamodule=data, verbose=False)
        trainer.fit(module, datamodule=data)
    assert sum(isinstance(c, EngineLifecycle) for c in trainer.callbacks) == 1
    assert "override existing callbacks" not in caplog.text
    assert engine.notices == 2
