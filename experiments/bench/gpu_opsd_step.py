"""GPU check of the real training path at the Qwen3-1.7B shape (random weights, the real Qwen3 tokenizer).

Runs this project's `OnPolicyModule` with OPSD's parts (the distill term on single rollouts, the reference
context) in a Lightning `Trainer` on one GPU:
- bf16 weights, LoRA r=64 on all linear layers, gradient checkpointing, the fixed teacher
  (adapters disabled), thinking mode, the chunked loss;
- 2 optimizer steps with `ModelCheckpoint` and `SaveAdapters`; then reloads the saved adapters with
  `peft` and checks that they reproduce the student's logits.
Prints and writes (`--out`) peak GPU memory, step times and rollout tokens/s.

    python experiments/bench/gpu_opsd_step.py --tokenizer <qwen3 tokenizer folder> --out gpu_opsd_step.json
    python experiments/bench/gpu_opsd_step.py --smoke --out <file.json> --workdir <dir>   # CPU (a test)
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.data.arith import generate_examples
from opsd_lightning.data.datamodule import collate_raw_text
from opsd_lightning.models import build_tiny
from opsd_lightning.models.lora import apply_peft
from opsd_lightning.objectives import Distill, ForwardKL
from opsd_lightning.rollout.samplers import SingleSampler
from opsd_lightning.teachers.modes import FixedTeacher
from opsd_lightning.training.callbacks import SaveAdapters
from opsd_lightning.training.module import OnPolicyModule

LORA = {
    "r": 64,
    "lora_alpha": 128,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class Timing(L.Callback):
    def __init__(self) -> None:
        self.steps: list[float] = []
        self.rollout_tokens_per_s: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps.append(time.perf_counter() - self._start)
        rate = trainer.callback_metrics.get("train/rollout_tokens_per_s")
        if rate is not None:
            self.rollout_tokens_per_s.append(float(rate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a Qwen3 tokenizer folder (with --smoke: the local tiny one)")
    parser.add_argument("--out", type=Path, default=Path("gpu_opsd_step.json"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 256 (8 with --smoke)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_opsd_step"))
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on CPU, to check the script")
    args = parser.parse_args()
    if not args.smoke and args.tokenizer is None:
        parser.error("--tokenizer is required without --smoke (a Qwen3 tokenizer folder)")
    args.max_new_tokens = args.max_new_tokens or (8 if args.smoke else 256)
    start = time.perf_counter()
    shape = dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144)
    if args.smoke:
        shape = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    device = "cpu" if args.smoke else "cuda"
    loaded = build_tiny(
        **shape,
        max_position_embeddings=40960,
        tokenizer_path=args.tokenizer,
        gradient_checkpointing=True,
        dtype="float32" if args.smoke else "bfloat16",
        attn_implementation="sdpa",
        seed=0,
    )
    loaded.model.name_or_path = ""  # random weights: the adapters name no base
    loaded.model = apply_peft(loaded.model, LORA)
    built_s = time.perf_counter() - start
    rows = generate_examples(
        4 * args.batch_size, seed=0, max_start=30, max_change=20
    )  # the rows of earlier runs
    module = OnPolicyModule(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        contexts=ContextRenderer(
            loaded.tokenizer, student_enable_thinking=True, teacher_enable_thinking=True
        ),
        optimizer=functools.partial(torch.optim.AdamW, lr=2e-4),
        terms=[Distill(ForwardKL(temperature=1.1), loss={"backend": "chunked", "chunk_size": 1024})],
        sampler=SingleSampler(),
        teacher=FixedTeacher(),
        sampling={"temperature": 1.1, "top_p": 0.95, "top_k": 20, "max_new_tokens": args.max_new_tokens},
    )
    timing = Timing()
    checkpoints = args.workdir / "checkpoints"
    trainer = L.Trainer(
        accelerator="cpu" if args.smoke else "gpu",
        devices=1,
        precision="32-true" if args.smoke else "bf16-true",
        max_steps=2,
        logger=False,
        callbacks=[
            ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=2, save_last=True),
            SaveAdapters(),
            timing,
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=args.workdir,
    )
    if not args.smoke:
        torch.cuda.reset_peak_memory_stats()
    loader = DataLoader(rows, batch_size=args.batch_size, collate_fn=collate_raw_text)
    trainer.fit(module, train_dataloaders=loader)
    peak_gib = 0.0 if args.smoke else torch.cuda.max_memory_allocated() / 2**30

    probe = torch.tensor([loaded.tokenizer.encode("What is 2 + 3? Put it in \\boxed{}.")], device=device)
    model = module.model.to(device).eval()  # Lightning moves the module back to the CPU after fit
    with torch.no_grad():
        student = model(input_ids=probe).logits.float()
        with model.disable_adapter():
            base = model(input_ids=probe).logits.float()
        # Keep the adapters in bf16: peft upcasts them to float32 by default, which changes the logits by
        # bf16 rounding (tests/models/test_adapters.py).
        model.load_adapter(
            str(checkpoints / "adapter-last"), adapter_name="reloaded", autocast_adapter_dtype=False
        )
        model.set_adapter("reloaded")
        again = model(input_ids=probe).logits.float()
    result = {
        "gpu": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "trainable_m": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 1),
        "build_s": round(built_s, 1),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "step_seconds": [round(s, 2) for s in timing.steps],
        "rollout_tokens_per_s": [round(r, 1) for r in timing.rollout_tokens_per_s],
        "generated_tokens": module.generated_tokens,
        "peak_gib": round(peak_gib, 2),
        "adapter_files": sorted(p.name for p in (checkpoints / "adapter-last").iterdir()),
        "adapters_moved_the_student": bool((student - base).abs().max() > 0),
        "reloaded_max_abs_diff": float((again - student).abs().max()),
        "total_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
