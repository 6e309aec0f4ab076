"""Lightning callbacks of our own: LoRA adapters saved in the standard PEFT folder format, and a stop on
SIGTERM / Ctrl-C that saves a checkpoint which resumes exactly."""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class SaveAdapters(L.Callback):
    """Next to every Lightning checkpoint, write the LoRA adapters as a PEFT folder.

    `<checkpoint dir>/adapter-step=<N>/` and `<checkpoint dir>/adapter-last/` load with
    `PeftModel.from_pretrained(base_model, folder)` (or `opsd-eval adapter=<folder>`) and hold the tokenizer
    too. Without `peft` adapters on the model this does nothing.
    """

    def __init__(self, keep_every: bool = True) -> None:
        self.keep_every = keep_every

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        model = getattr(pl_module, "model", None)
        if model is None or not hasattr(model, "peft_config") or not trainer.is_global_zero:
            return
        callback = trainer.checkpoint_callback
        root = Path(callback.dirpath if callback and callback.dirpath else trainer.default_root_dir)
        last = root / "adapter-last"
        folders = [root / f"adapter-step={trainer.global_step}"] if self.keep_every else []
        for folder in [*folders, last]:
            if folder.exists():
                shutil.rmtree(folder)
            model.save_pretrained(str(folder))
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(folder))
        log.info("Saved LoRA adapters to %s", last)


class TrainingInterrupted(Exception):
    """Raised by `GracefulStop` after it saved `checkpoint`; `signal_number` is what stopped the run."""

    def __init__(self, signal_number: int, checkpoint: str, step: int) -> None:
        self.signal_number, self.checkpoint, self.step = signal_number, checkpoint, step
        name = signal.Signals(signal_number).name
        super().__init__(f"{name} at optimizer step {step}: the run is saved in {checkpoint}")


class GracefulStop(L.Callback):
    """On SIGTERM (a cluster's preemption or time limit) or a first Ctrl-C, finish the current optimizer
    step, save `<checkpoint dir>/interrupted.ckpt` and raise `TrainingInterrupted`. A second Ctrl-C stops
    at once, as usual.

    The checkpoint is written between optimizer steps, like `ModelCheckpoint`'s, so `ckpt_path=` resumes
    the run exactly (weights, optimizer, scheduler, EMA teacher, RNG, data position). Lightning's own
    SIGTERM handling only stops at an epoch's end, which can be hours away on a large dataset.
    """

    def __init__(self) -> None:
        self._signal: int | None = None
        self._announcement: str | None = None  # what a signal handler recorded, logged outside the handler
        self._previous_sigint = None
        self._requeue_signal: int | None = None
        self._requeue_handler = None  # Lightning's SLURM requeue handler, called at the step boundary

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signal = None
        if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
            return
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            # Lightning saves and requeues the moment its signal arrives, possibly mid-step; defer its
            # handler to the end of the step so the checkpoint resumes exactly.
            self._requeue_signal = environment.requeue_signal or signal.SIGUSR1
            self._requeue_handler = signal.signal(self._requeue_signal, self._on_requeue)
        log.info("SIGTERM or Ctrl-C saves a checkpoint after the current optimizer step and stops the run")

    # The handlers only record the signal: logging from a handler can re-enter a stream the interrupted code
    # is flushing (a "reentrant call" error). The message is logged at the end of the current micro-batch.
    def _on_requeue(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum
        self._announcement = "SLURM requeue signal: saving and requeueing after the current optimizer step"

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is not None:  # a second Ctrl-C: the usual KeyboardInterrupt
            signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)
            raise KeyboardInterrupt
        self._signal = signum
        self._announcement = "Ctrl-C: stopping after the current optimizer step (again to stop at once)"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._announcement is not None:
            log.warning(self._announcement)
            self._announcement = None
        if not getattr(pl_module, "ended_optimizer_step", True):
            return
        local = self._signal or (signal.SIGTERM if trainer.received_sigterm else 0)
        # Any rank's signal stops every rank, at the same step (a collective decision).
        if not trainer.strategy.reduce_boolean_decision(bool(local), all=False):
            return
        if local and local == self._requeue_signal and callable(self._requeue_handler):
            # Lightning's handler writes hpc_ckpt_<n>.ckpt in default_root_dir, which the requeued job
            # (same command, same output folder) resumes from, and calls `scontrol requeue`.
            path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
            self._requeue_handler(local, None)
        else:
            callback = trainer.checkpoint_callback
            folder = getattr(callback, "dirpath", None) or f"{trainer.default_root_dir}/checkpoints"
            path = f"{folder}/interrupted.ckpt"
            trainer.save_checkpoint(path)
        raise TrainingInterrupted(local or signal.SIGTERM, path, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, error: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        if self._requeue_signal is not None:
            signal.signal(self._requeue_signal, self._requeue_handler or signal.SIG_DFL)
            self._requeue_signal = self._requeue_handler = None
