"""Sharded strategies. Lightning refuses FSDP without a GPU ("The strategy `fsdp` requires a GPU
accelerator"), so these are `gpu` tests, skipped on CPU machines."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from opsd_lightning.data import ArithDataModule

from .conftest import build_small_tiny, opsd_module, quiet_trainer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_generates_rollouts_and_trains_with_decoder_layers_wrapped(tmp_path):
    """Rollouts run inside `training_step`, within the root FSDP module's forward, so every FSDP unit gathers
    its shard when `generate` calls it. Two steps on one GPU must generate tokens and give a finite loss.
    (One device: more would make Lightning relaunch pytest itself in a process per device.)"""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    module = opsd_module(build_small_tiny(), sampling={"temperature": 1.0, "max_new_tokens": 8})
    trainer = quiet_trainer(
        tmp_path,
        accelerator="gpu",
        devices=1,
        strategy=FSDPStrategy(auto_wrap_policy={Qwen3DecoderLayer}, state_dict_type="full"),
        max_steps=2,
    )
    trainer.fit(module, datamodule=ArithDataModule(train_size=8, val_size=4, batch_size=2, seed=0))
    assert trainer.global_step == 2 and module.generated_tokens > 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
