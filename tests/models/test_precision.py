"""Every `trainer.precision` trains one real Lightning step with either `algorithm.loss.backend`.

The chunked loss forms its own float32 logits, so an outer autocast (the `*-mixed` precisions) must not
reach into it: `bf16-mixed`, the GPU trainers' default, once crashed there. For each precision both
backends take one optimizer step from the same random tiny model and the same rollouts: the step runs,
the loss is finite, every weight matrix moves, and the two backends agree as closely as that precision
allows.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from opsd_lightning.data import ArithDataModule
from opsd_lightning.models import LoadedModel
from tests.conftest import opsd_module, quiet_trainer
from tests.tolerances import summed_tolerance

# 16-mixed is a GPU case only: on CPU Lightning swaps it for bf16-mixed (fp16 AMP is CUDA's there).
CPU_PRECISIONS = ("32-true", "64-true", "bf16-mixed", "bf16-true", "16-true")
GPU_PRECISIONS = (*CPU_PRECISIONS, "16-mixed")

# How far the backends may differ: (loss difference, norm of the update difference relative to the
# update's).
# - Full precisions: both backends compute the same sums in another order, so the loss may differ by one
#   eps of the magnitudes it sums (`tolerances.summed_tolerance`), not by a fraction of the loss: the loss
#   is the KL of two nearly equal distributions (~7e-5) while each token sums terms of |log p| ~ log V
#   (~6). A relative 1e-5 passed on an Intel Xeon and failed on an AMD EPYC (issue 18).
# - Half precisions: `full_logits` takes the model's logits in the model's (or autocast's) dtype while
#   `chunked` forms float32 ones, so they differ by the half format's rounding of the logits, whatever the
#   summation order: a fraction (1e-2) of the loss, about the format's eps. `*-true` half weights also
#   round each update to their own spacing.
# Measured on CPU (loss relative / update): 6e-5 / 2e-5 in 32-true, 3e-4 / 2e-2 in bf16-mixed,
# 1e-3 / 4e-2 in 16-true, 0 / 0.12 in bf16-true.
FULL_PRECISION = {"64-true": torch.float64, "32-true": torch.float32}
AGREEMENT = {
    "64-true": (None, 1e-9),
    "32-true": (None, 1e-3),
    "bf16-mixed": (1e-2, 0.1),
    "16-mixed": (1e-2, 0.1),
    "16-true": (1e-2, 0.2),
    "bf16-true": (1e-2, 0.3),
}


@dataclass
class OneStep:
    """What one optimizer step did: its logged loss, and each parameter's change."""

    loss: float
    teacher_entropy: float  # mean over the step's tokens, nats
    updates: dict[str, torch.Tensor]  # after − before, in the trained dtype, on the CPU

    def flat_update(self) -> torch.Tensor:
        return torch.cat([update.double().flatten() for update in self.updates.values()])


def one_step(tiny: LoadedModel, precision: str, backend: str, accelerator: str, root: Path) -> OneStep:
    """One OPSD optimizer step (2 problems, 4 sampled tokens each) on a copy of the tiny model."""
    loaded = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer)
    before = {name: param.detach().clone() for name, param in loaded.model.named_parameters()}
    module = opsd_module(
        loaded, loss={"backend": backend}, sampling={"temperature": 1.0, "max_new_tokens": 4}
    )
    trainer = quiet_trainer(root, accelerator=accelerator, devices=1, precision=precision, max_steps=1)
    trainer.fit(module, datamodule=ArithDataModule(train_size=2, val_size=2, batch_size=2, seed=0))
    assert trainer.global_step == 1
    # `*-true` precisions convert the weights: compare with the converted starting point.
    after = {name: param.detach().cpu() for name, param in loaded.model.named_parameters()}
    updates = {name: after[name] - before[name].to(after[name].dtype) for name in before}
    metrics = trainer.callback_metrics
    return OneStep(float(metrics["train/loss"]), float(metrics["train/diag/teacher_entropy"]), updates)


def check_both_backends(tiny: LoadedModel, precision: str, accelerator: str, root: Path) -> None:
    steps = {
        backend: one_step(tiny, precision, backend, accelerator, root / backend)
        for backend in ("chunked", "full_logits")
    }
    for backend, step in steps.items():
        assert math.isfinite(step.loss) and step.loss > 0, backend
        still = [name for name, update in step.updates.items() if update.dim() == 2 and not update.any()]
        assert not still, f"{backend}: weight matrices that did not move: {still}"
    loss_rtol, update_rtol = AGREEMENT[precision]
    chunked, full_logits = steps["chunked"], steps["full_logits"]
    if precision in FULL_PRECISION:
        # Forward KL per token sums p_T·log p_T and p_T·log p_S: Σ|terms| = H(T) + H(T, S) = 2·H(T) + KL.
        magnitude = 2 * full_logits.teacher_entropy + full_logits.loss
        loss_atol = summed_tolerance(magnitude, FULL_PRECISION[precision])
        assert abs(chunked.loss - full_logits.loss) <= loss_atol, (chunked.loss, full_logits.loss, loss_atol)
    else:
        assert chunked.loss == pytest.approx(full_logits.loss, rel=loss_rtol)
    chunked_update, reference_update = chunked.flat_update(), full_logits.flat_update()
    difference = float((chunked_update - reference_update).norm() / reference_update.norm())
    assert difference <= update_rtol, f"updates differ by {difference:.2e} (relative)"


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_one_step_in_every_precision_with_both_loss_backends(tiny, precision, tmp_path):
    check_both_backends(tiny, precision, "cpu", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", GPU_PRECISIONS)
def test_one_step_in_every_precision_with_both_loss_backends_on_a_gpu(tiny, precision, tmp_path):
    check_both_backends(tiny, precision, "gpu", tmp_path)


def test_the_deprecated_naive_backend_trains_as_full_logits(tiny, tmp_path):
    with pytest.warns(FutureWarning, match="algorithm.loss.backend='full_logits'"):
        alias = one_step(tiny, "32-true", "naive", "cpu", tmp_path / "naive")
    renamed = one_step(tiny, "32-true", "full_logits", "cpu", tmp_path / "full_logits")
    assert alias.loss == renamed.loss
    for name, update in renamed.updates.items():
        assert torch.equal(alias.updates[name], update), name
