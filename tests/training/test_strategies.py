"""Sharded strategies. Lightning refuses FSDP without a GPU ("The strategy `fsdp` requires a GPU
accelerator"), so these are `gpu` tests, skipped on CPU machines."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from opsd_lightning.data import ArithDataModule
from tests.conftest import build_small_tiny, opsd_module, quiet_trainer


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


def test_deepspeed_is_refused_before_any_model_loads(tmp_path):
    """DeepSpeed owns the gradients (ZeRO partitions), where the token-mean rescale cannot reach them."""
    from opsd_lightning.cli.checks import check_config
    from tests.cli.test_configs import compose_train

    cfg = compose_train(["trainer=gpu", "+trainer.strategy=deepspeed_stage_2"], tmp_path)
    with pytest.raises(ValueError, match="trainer.strategy=deepspeed_stage_2: DeepSpeed keeps gradients"):
        check_config(cfg)


def clipped_update_norm(precision: str, accelerator: str, root, clip: float) -> float:
    """The norm of one SGD(lr=1) step's update when `gradient_clip_val=clip` engages (it is far below the
    gradient's norm): the clipped gradient's norm, i.e. `clip`, if the clip sees unscaled gradients."""
    import functools

    loaded = build_small_tiny()
    before = [p.detach().clone() for p in loaded.model.parameters()]
    module = opsd_module(loaded, optimizer=functools.partial(torch.optim.SGD, lr=1.0), gradient_clip_val=clip)
    trainer = quiet_trainer(root, accelerator=accelerator, devices=1, precision=precision, max_steps=1)
    trainer.fit(module, datamodule=ArithDataModule(train_size=2, val_size=2, batch_size=2, seed=0))
    after = [p.detach().cpu().float() for p in loaded.model.parameters()]
    return float(torch.cat([(a - b.float()).flatten() for a, b in zip(after, before, strict=True)]).norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_16_mixed_clips_the_unscaled_gradients(tmp_path):
    """Under fp16 AMP the gradients are still scaled (by ~65536) when the module rescales and clips them:
    clipping them as they are would shrink the update by the scale. The update must be the clip value, as in
    32-true (fp16 rounding of the weights aside)."""
    clip = 1e-3
    reference = clipped_update_norm("32-true", "gpu", tmp_path / "fp32", clip)
    assert reference == pytest.approx(clip, rel=1e-3)
    assert clipped_update_norm("16-mixed", "gpu", tmp_path / "fp16", clip) == pytest.approx(clip, rel=0.05)


def test_the_clip_engages_on_the_cpu_as_the_gpu_test_expects(tmp_path):
    """The CPU half of the check above: in 32-true the clipped update's norm is the clip value."""
    clip = 1e-3
    assert clipped_update_norm("32-true", "cpu", tmp_path, clip) == pytest.approx(clip, rel=1e-3)
