"""The optimizer step of an on-policy module: a token mean over the whole step, manual optimization,
non-finite skipping, accounting, and the checkpoint state that is not a tensor.

A subclass implements `micro_batch_loss(batch, micro_index)` returning the SUM of per-token losses and the
token count; this class turns those into one token-mean gradient per optimizer step, across gradient
accumulation and across DDP ranks (trap 4 in docs: averaging per micro-batch weights short and long
completions differently).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning

from opsd_lightning.rollout import Rollout
from opsd_lightning.training.settings import StepSettings

RAW_BATCH_KEYS = ("problem", "solution")

log = logging.getLogger(__name__)


@dataclass
class MicroBatchLoss:
    """A micro-batch's summed loss, its token count, and scalar statistics to log (means over the step).

    `backward_done`: the subclass already back-propagated `loss_sum` (in pieces, to bound memory), so
    the base class only books it.
    """

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    backward_done: bool = False


def check_raw_batch(batch: Mapping) -> None:
    """A user datamodule must yield raw text; say exactly what is expected when it does not."""
    missing = [key for key in RAW_BATCH_KEYS if key not in batch]
    if missing or not isinstance(batch.get("problem"), list | tuple):
        raise ValueError(
            f"a training batch has keys {sorted(batch)}; expected raw text "
            '{"problem": list[str], "solution": list[str], "answer": list[str] (optional)}'
            f"{' (missing: ' + ', '.join(missing) + ')' if missing else ''}. "
            "See README, 'Your own datamodule'."
        )


class OptimizerStepper(L.LightningModule):
    """Manual optimization with one token-mean step per `accumulate_grad_batches` micro-batches.

    Subclasses set `self.model` and `self.engine` (whose lifecycle `rollout/lifecycle.py` keeps), and
    implement `micro_batch_loss` and, optionally, `after_optimizer_step` (e.g. the EMA teacher update).
    """

    def __init__(
        self,
        steps: StepSettings,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False  # we own the step-level token normalisation
        self.steps = steps
        self.accumulate_grad_batches = steps.accumulate_grad_batches
        self.gradient_clip_val = steps.gradient_clip_val
        self.max_nonfinite_steps_in_a_row = steps.max_nonfinite_steps_in_a_row
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.nonfinite_steps = 0  # skipped optimizer steps, saved in checkpoints
        self._nonfinite_in_a_row = 0
        self.ended_optimizer_step = False
        self.generated_tokens = 0  # cumulative over all ranks, saved in checkpoints
        self._fit_start = time.perf_counter()
        self._window: dict[str, float] = {}
        self._window_stats: dict[str, list[float]] = {}

    def micro_batch_loss(self, batch: Mapping, micro_index: int) -> MicroBatchLoss:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Hook for subclasses (e.g. the EMA teacher update)."""

    def on_fit_start(self) -> None:
        check_strategy(type(self.trainer.strategy).__name__)
        # Lightning warns about modules in eval mode before `on_train_start` puts the model in train mode;
        # what stays in eval then is the frozen teacher's copy, by design. The warning would only alarm.
        warnings.filterwarnings(
            "ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning
        )

    def on_train_start(self) -> None:
        # from_pretrained leaves models in eval mode and Lightning keeps modes as it finds them.
        self.train()
        self._fit_start = time.perf_counter()

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters (check peft / freezing settings)")
        optimizer = self.optimizer_factory(trainable)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def rollout_seed(self, micro_index: int) -> int:
        return hash((self.seed, self.global_step, micro_index, self.global_rank)) % (2**31)

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        micro_index = batch_idx % self.accumulate_grad_batches
        if micro_index == 0:
            self._window = {
                "loss_sum": 0.0,
                "num_tokens": 0.0,
                "generated": 0.0,
                "start": time.perf_counter(),
            }
            self._window_stats = {}
        result = self.micro_batch_loss(batch, micro_index)
        if not result.backward_done:
            self.manual_backward(result.loss_sum)
        self._window["loss_sum"] += float(result.loss_sum.detach())
        self._window["num_tokens"] += float(result.num_tokens)
        for name, value in result.stats.items():
            self._window_stats.setdefault(name, []).append(value)
        # Read by GracefulStop: a checkpoint between optimizer steps resumes exactly.
        self.ended_optimizer_step = micro_index + 1 == self.accumulate_grad_batches or self._is_last_batch(
            batch_idx
        )
        if self.ended_optimizer_step:
            self._optimizer_step()
        return result.loss_sum.detach()

    def _is_last_batch(self, batch_idx: int) -> bool:
        num_batches = self.trainer.num_training_batches
        return isinstance(num_batches, int) and batch_idx + 1 == num_batches

    def _optimizer_step(self) -> None:
        optimizer = self.optimizers()
        grads = optimized_gradients(optimizer)
        # fp16 AMP (`16-mixed`): the gradients are still multiplied by the scaler's scale here (Lightning
        # unscales them inside `optimizer.step()`, after this method; Lightning issue 18089). A non-finite one
        # is the scaler's business: it skips that step and lowers its scale. The clip threshold is scaled too.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        grad_scale = float(scaler.get_scale()) if scaler is not None else 1.0
        nonfinite_grads = scaler is None and not gradients_are_finite(grads)
        faults = float(not math.isfinite(self._window["loss_sum"]) or nonfinite_grads)
        window = self._window
        totals = torch.tensor(
            [window["loss_sum"], window["num_tokens"], faults, window.get("generated", 0.0)],
            device=self.device,
        )
        # Summed over ranks, so every rank takes the same decision about skipping.
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss_sum, num_tokens = float(totals[0]), float(totals[1])
        self.generated_tokens += int(totals[3])  # generated, whether or not the step is skipped
        if totals[2] > 0:
            self._skip_nonfinite_step(optimizer)
            return
        self._nonfinite_in_a_row = 0
        if num_tokens > 0:
            # Each rank back-propagated its token SUM and DDP averaged over ranks: rescale to a global mean.
            # The gradients are those the optimizer steps with (under FSDP, its sharded ones).
            torch._foreach_mul_(grads, self.trainer.world_size / num_tokens)
            if self.gradient_clip_val:
                self.clip_gradients(
                    optimizer,
                    gradient_clip_val=self.gradient_clip_val * grad_scale,
                    gradient_clip_algorithm="norm",
                )
        else:
            # Nothing to learn from (e.g. every rollout truncated and masked). Still take the step, with
            # no gradients, so that the step counter, the schedule and max_steps move on.
            optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if num_tokens > 0:
            self.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds = time.perf_counter() - self._window["start"]
        self.log("train/loss", loss_sum / max(num_tokens, 1.0), prog_bar=True)
        self.log("train/trained_tokens", num_tokens)
        self.log("train/step_seconds", step_seconds)
        if self.engine.last_sync_seconds is not None:  # the weights copied into the engine before this step
            self.log("train/weight_sync_seconds", self.engine.last_sync_seconds)
        self.log("train/generated_tokens_total", float(self.generated_tokens), prog_bar=True)
        # The same accounting for every algorithm, so runs compare on cost as well as accuracy.
        self.log("train/optimizer_steps", float(self.global_step))
        self.log("train/wall_seconds", time.perf_counter() - self._fit_start)
        for name, values in self._window_stats.items():
            self.log(f"train/{name}", sum(values) / len(values), prog_bar=name == "completion_length")

    def _skip_nonfinite_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step's gradients (no optimizer, scheduler or teacher update); stop after too many."""
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        if self.global_rank == 0:
            log.warning(
                "Step %d: the loss or a gradient is not finite; the step is skipped (%d in a row, %d in all)",
                self.global_step,
                self._nonfinite_in_a_row,
                self.nonfinite_steps,
            )
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps_in_a_row:
            path = self._save_fault_checkpoint()
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(algorithm.max_nonfinite_steps_in_a_row={self.max_nonfinite_steps_in_a_row}). The weights "
                f"of the last good step ({self.global_step}) are saved in {path}; resume with "
                f"ckpt_path={path} after lowering the learning rate, enabling gradient clipping "
                "(algorithm.gradient_clip_val) or checking the model's dtype (bf16 rather than fp16)."
            )

    def _save_fault_checkpoint(self) -> str:
        callback = self.trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or f"{self.trainer.default_root_dir}/checkpoints"
        path = f"{folder}/nonfinite-step={self.global_step}.ckpt"
        self.trainer.save_checkpoint(path)
        return path

    def count_generated(self, rollout: Rollout) -> int:
        """Count this rank's generated tokens; returns them. No collective here: the optimizer step sums the
        window's count over ranks with its other totals, so a rank that refuses a batch before generating
        never leaves the others waiting in a count's all-reduce."""
        self._window["generated"] = self._window.get("generated", 0.0) + rollout.num_tokens
        return rollout.num_tokens

    # ---- checkpoint state that is not a tensor ------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["opsd_generated_tokens"] = self.generated_tokens
        checkpoint["opsd_nonfinite_steps"] = self.nonfinite_steps
        # Rollouts are seeded by (seed, step, micro-batch, rank); the global streams (dropout) are saved
        # so that a resumed run continues exactly.
        checkpoint["opsd_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.generated_tokens = checkpoint.get("opsd_generated_tokens", 0)
        self.nonfinite_steps = checkpoint.get("opsd_nonfinite_steps", 0)
        rng = checkpoint.get("opsd_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def optimized_gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The gradients the optimizer will step with: its own parameters' (under FSDP, the flat sharded ones)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # under a LightningOptimizer
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def gradients_are_finite(grads: list[torch.Tensor]) -> bool:
    # One fused norm per tensor: a NaN or an Inf anywhere makes its norm non-finite.
    return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())


def check_strategy(name: str) -> None:
    """Refuse a strategy under which the token-mean rescale would silently do nothing: DeepSpeed keeps the
    gradients in its own (ZeRO-partitioned) buffers, out of reach of the optimizer's `param.grad`."""
    if "deepspeed" in name.lower():
        raise ValueError(
            f"trainer.strategy={name}: DeepSpeed keeps gradients in its own partitioned buffers, where the "
            "token mean over the optimizer step (a rescale of the gradients before the step) cannot reach "
            "them, so the loss would be a token sum. Use trainer=ddp, or trainer=fsdp to shard parameters, "
            "gradients and optimizer states"
        )
