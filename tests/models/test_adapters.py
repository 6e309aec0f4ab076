"""LoRA adapters leave training as standard PEFT folders next to the Lightning checkpoints; they reload with
`peft` and reproduce the student, and `opsd-export` merges them into a plain checkpoint that does too."""

from __future__ import annotations

import functools

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from opsd_lightning.cli.export import main as export_main
from opsd_lightning.data import ArithDataModule
from opsd_lightning.models import save_pretrained
from opsd_lightning.models.lora import apply_peft
from opsd_lightning.training.callbacks import SaveAdapters
from tests.conftest import opsd_module, quiet_trainer


def test_adapters_are_saved_in_peft_format_reload_and_export_merged(fresh_tiny, tmp_path):
    from peft import PeftModel

    base_dir = save_pretrained(fresh_tiny, tmp_path / "base")  # the base the adapters name
    fresh_tiny.model.name_or_path = str(base_dir)
    fresh_tiny.model = apply_peft(
        fresh_tiny.model,
        {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    )
    # OPSD (forward KL, the fixed teacher: the base under the adapters, 6 sampled tokens) with AdamW.
    module = opsd_module(fresh_tiny, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
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


def test_bf16_adapters_reload_bit_exact_unless_peft_upcasts_them(tmp_path):
    """peft's loaders upcast bf16 adapters to float32 by default (`autocast_adapter_dtype=True`), so a reload
    differs from the bf16 student by bf16 rounding; with `autocast_adapter_dtype=False` it is bit-exact.
    The likely cause of the 0.135 logit difference in the H100 run (experiments/bench/gpu_opsd_step.py)."""
    from opsd_lightning.models import build_tiny

    loaded = build_tiny(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
    model = apply_peft(
        loaded.model, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    )
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # as if trained: a zero B would make every comparison trivially equal
            parameter.data.normal_(0, 0.2)
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    probe = torch.tensor([[1, 20, 21, 22, 23, 40, 41]])
    with torch.no_grad():
        student = model(input_ids=probe).logits
        model.load_adapter(str(tmp_path), adapter_name="exact", autocast_adapter_dtype=False)
        model.set_adapter("exact")
        torch.testing.assert_close(model(input_ids=probe).logits, student, rtol=0, atol=0)
        model.load_adapter(str(tmp_path), adapter_name="upcast")
        model.set_adapter("upcast")
        upcast = model(input_ids=probe).logits
    assert not torch.equal(upcast, student)
    torch.testing.assert_close(upcast, student, rtol=0.02, atol=0.02)  # bf16 rounding, not a wrong adapter
