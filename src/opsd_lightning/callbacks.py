"""Lightning callbacks of our own: LoRA adapters saved in the standard PEFT folder format."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L

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
