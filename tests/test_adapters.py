"""LoRA adapters leave training as standard PEFT folders next to the Lightning checkpoints; they reload with
`peft` and reproduce the student, and `opsd-export` merges them into a plain checkpoint that does too."""

from __future__ import annotations

import functools

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from opsd_lightning.algorithms import OPSDModule
from opsd_lightning.callbacks import SaveAdapters
from opsd_lightning.contexts import ContextRenderer
from opsd_lightning.data import ArithDataModule
from opsd_lightning.export import main as export_main
from opsd_lightning.losses import ForwardKL
from opsd_lightning.models import save_pretrained
from opsd_lightning.peft_utils import apply_peft
from opsd_lightning.teachers import FixedTeacher

from .conftest import quiet_trainer


def test_adapters_are_saved_in_peft_format_reload_and_export_merged(fresh_tiny, tmp_path):
    from peft import PeftModel

    base_dir = save_pretrained(fresh_tiny, tmp_path / "base")  # the base the adapters name
    fresh_tiny.model.name_or_path = str(base_dir)
    fresh_tiny.model = apply_peft(
        fresh_tiny.model,
        {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    )
    module = OPSDModule(
        model=fresh_tiny.model,
        tokenizer=fresh_tiny.tokenizer,
        contexts=ContextRenderer(fresh_tiny.tokenizer),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        divergence=ForwardKL(),
        teacher=FixedTeacher(),
        sampling={"temperature": 1.0, "max_new_tokens": 6},
    )
    checkpoints = tmp_path / "checkpoints"
    callbacks = [ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=1, save_last=True), SaveAdapters()]
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, datamodule=ArithDataModule(train_size=16, val_size=4, batch_size=2, seed=0))
    assert (checkpoints / "last.ckpt").is_file()
    adapter = checkpoints / "adapter-last"
    assert (adapter / "adapter_config.json").is_file() and (checkpoints / "adapter-step=2").is_dir()

    probe = torch.tensor([[1, 20, 21, 22, 23]])
    fresh_tiny.model.eval()
    with torch.no_grad():
        student = fresh_tiny.model(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter))
        torch.testing.assert_close(reloaded(input_ids=probe).logits, student)

    export_main([str(adapter), str(tmp_path / "merged"), "--dtype", "float32"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, student, atol=1e-5, rtol=1e-4)
    assert not any("lora" in name for name, _ in merged.named_parameters())
