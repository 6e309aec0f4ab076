"""Warm-up for the tiny default: a stand-in for a pretrained LLM, trained briefly and cached.

A random tiny model knows nothing, so OPSD would have nothing to distil. The warm-up trains it with
plain next-token loss on synthetic arithmetic problems in BOTH formats it will meet:
student context -> reference solution, and teacher context (reference in view) -> the same solution,
so it learns to solve (a little) and to use a reference in its context (a lot). The result is saved as
a standard Hugging Face folder keyed by a hash of everything that shapes it, and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from opsd_lightning.contexts import ContextRenderer, left_pad
from opsd_lightning.data.arith import generate_examples
from opsd_lightning.models import LoadedModel, build_tiny, save_pretrained

log = logging.getLogger(__name__)
WARMUP_VERSION = 1  # bump when the warm-up recipe changes, so stale caches are not reused


@dataclass
class WarmupConfig:
    """How the tiny base is made (`conf/warmup/arith.yaml`)."""

    cache_dir: str = ".cache/opsd-lightning"
    num_examples: int = 20000
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    teacher_fraction: float = 0.5
    num_steps: tuple[int, ...] = (2, 3)
    max_start: int = 30
    max_change: int = 20
    seed: int = 1234


def sft_tensors(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Left-padded `[prompt | completion]` with labels only on completion tokens (-100 elsewhere)."""
    batch = left_pad([p + c for p, c in zip(prompts, completions, strict=True)], pad_id)
    labels = torch.full_like(batch.input_ids, -100)
    width = batch.input_ids.shape[1]
    for row, completion in enumerate(completions):
        labels[row, width - len(completion) :] = batch.input_ids[row, width - len(completion) :]
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": position_ids,
        "labels": labels,
    }


def tokenizer_corpus(examples: list[dict[str, str]], templates: list[str]) -> list[str]:
    """Text the tiny tokenizer learns its merges from: task text plus the prompt templates."""
    return [text for example in examples for text in (example["problem"], example["solution"])] + templates


def warmup_fingerprint(
    model_kwargs: dict, warmup: WarmupConfig, renderer_settings: dict, exclude: list[str]
) -> str:
    payload = {
        "version": WARMUP_VERSION,
        "model": model_kwargs,
        "warmup": {k: v for k, v in asdict(warmup).items() if k != "cache_dir"},
        "contexts": renderer_settings,
        "held_out": hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


def prepare_tiny_base(
    model_kwargs: dict, warmup: WarmupConfig, context_kwargs: dict, held_out_problems: list[str]
) -> Path:
    """Return the cached tiny base checkpoint folder, training it first if it is not there yet.

    `held_out_problems` are never trained on, so held-out accuracy stays honest.
    """
    model_kwargs = {k: v for k, v in model_kwargs.items() if k not in ("checkpoint", "_target_")}
    folder = (
        Path(warmup.cache_dir)
        / f"tiny-base-{warmup_fingerprint(model_kwargs, warmup, context_kwargs, held_out_problems)}"
    )
    if (folder / "config.json").is_file() and (folder / "warmup.json").is_file():
        log.info("Reusing the cached tiny base model at %s", folder)
        return folder

    examples = generate_examples(
        warmup.num_examples,
        warmup.seed,
        warmup.num_steps,
        warmup.max_start,
        warmup.max_change,
        exclude=set(held_out_problems),
    )
    templates = [context_kwargs.get("student_template", ""), context_kwargs.get("teacher_template", "")]
    loaded = build_tiny(**model_kwargs, corpus=tokenizer_corpus(examples, templates))
    renderer = ContextRenderer(loaded.tokenizer, **context_kwargs)
    final_loss = train_supervised(loaded, renderer, examples, warmup)

    tmp = folder.with_name(folder.name + ".tmp")
    save_pretrained(loaded, tmp)
    (tmp / "warmup.json").write_text(
        json.dumps({"config": asdict(warmup), "final_loss": final_loss}, indent=2, default=list)
    )
    tmp.replace(folder)  # atomic: an interrupted warm-up never leaves a half-written cache entry
    log.info("Saved the tiny base model to %s", folder)
    return folder


def train_supervised(
    loaded: LoadedModel, renderer: ContextRenderer, examples: list[dict[str, str]], warmup: WarmupConfig
) -> float:
    """Next-token loss on solutions, from the student context or (teacher_fraction) the teacher context."""
    model, tokenizer = loaded.model, loaded.tokenizer
    rng = random.Random(warmup.seed)
    torch.manual_seed(warmup.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=warmup.lr, weight_decay=warmup.weight_decay)

    def lr_factor(step: int) -> float:
        if step < warmup.warmup_steps:
            return (step + 1) / warmup.warmup_steps
        progress = (step - warmup.warmup_steps) / max(1, warmup.steps - warmup.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    smoothed = float("nan")
    progress = tqdm(range(warmup.steps), desc="warm-up (tiny base)", dynamic_ncols=True)
    for _ in progress:
        batch = rng.sample(examples, warmup.batch_size)
        prompts = [
            renderer.teacher_ids(ex["problem"], ex["solution"])
            if rng.random() < warmup.teacher_fraction
            else renderer.student_ids(ex["problem"])
            for ex in batch
        ]
        completions = [
            tokenizer.encode(ex["solution"], add_special_tokens=False) + [tokenizer.eos_token_id]
            for ex in batch
        ]
        loss = model(**sft_tensors(prompts, completions, tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = float(loss) if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * float(loss)
        progress.set_postfix(loss=f"{smoothed:.3f}")
    model.eval()
    return smoothed
