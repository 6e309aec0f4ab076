"""Warm-up for the tiny default: a stand-in for a pretrained LLM, trained briefly and cached.

A random tiny model knows nothing, so OPSD would have nothing to distil. The warm-up trains it with
plain next-token loss on synthetic arithmetic problems in BOTH formats it will meet:

- student context -> its "own" solution, in which each arithmetic step slips (is off by 1-3) with
  probability `slip_rate`: a stand-in for a real base model's unreliable reasoning;
- teacher context (the verified reference in view) -> the same kind of slipped chain, but the slipped
  results are never training targets: with a reference in view it continues whatever chain it is
  given (as it must when it scores a student's tokens) and computes each step correctly.

So the base is a moderate, unreliable solver on its own and a reliable one with the reference: the
situation OPSD is made for. The result is saved as a standard Hugging Face folder keyed by a hash of
everything that shapes it, and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from opsd_lightning.contexts.batches import left_pad, position_ids_from_mask
from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.data.arith import (
    MAX_CHANGE,
    MAX_START,
    NUM_STEPS,
    ArithProblem,
    generate_problems,
    slipped_solution,
)
from opsd_lightning.environments.format import ToolFormat
from opsd_lightning.models import LoadedModel, build_tiny, save_pretrained
from opsd_lightning.models.tiny import build_tiny_tokenizer
from opsd_lightning.models.tool_warmup import tool_corpus, tool_schemas, tool_warmup_pair, tools_prompt

log = logging.getLogger(__name__)
WARMUP_VERSION = 3  # bump when the warm-up recipe changes, so stale caches are not reused


@dataclass
class WarmupConfig:
    """How the tiny base is made (`conf/warmup/arith.yaml`)."""

    cache_dir: str = ".cache/opsd-lightning"
    num_examples: int = 20000
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    teacher_fraction: float = 0.5
    slip_rate: float = 0.25
    reference_style: str = "steps"
    num_steps: tuple[int, ...] = NUM_STEPS
    max_start: int = MAX_START
    max_change: int = MAX_CHANGE
    seed: int = 1234
    # The prompt format the base is trained in; None = the run's `context`. Experiments that ablate the
    # context pin it, so that every variant starts from the same base.
    context: dict | None = None


def sft_tensors(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    completion_loss_masks: list[list[bool]] | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded `[prompt | completion]` with labels on completion tokens only (-100 elsewhere);
    `completion_loss_masks` can drop further completion tokens from the loss."""
    batch = left_pad([p + c for p, c in zip(prompts, completions, strict=True)], pad_id)
    labels = torch.full_like(batch.input_ids, -100)
    width = batch.input_ids.shape[1]
    for row, completion in enumerate(completions):
        targets = batch.input_ids[row, width - len(completion) :].clone()
        if completion_loss_masks is not None:
            targets[~torch.as_tensor(completion_loss_masks[row], dtype=torch.bool)] = -100
        labels[row, width - len(completion) :] = targets
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": position_ids_from_mask(batch.attention_mask),
        "labels": labels,
    }


def tokenizer_corpus(
    problems: list[ArithProblem], templates: list[str], reference_style: str = "steps"
) -> list[str]:
    """Text the tiny tokenizer learns its merges from: task text, references, the prompt templates."""
    texts = [text for p in problems for text in (p.problem_text(), p.solution_text())]
    if reference_style != "steps":  # `steps` references are the solutions themselves
        texts += [p.reference_text(reference_style) for p in problems]
    # Templates are repeated so their words get merges: they appear in every prompt.
    return texts + templates * 200


def warmup_fingerprint(
    model_kwargs: dict, warmup: WarmupConfig, renderer_settings: dict, exclude: list[str]
) -> str:
    # Reason-first turns never appear in the warm-up, so they do not change the base.
    unused = ("rationale_template", "rationale_followup")
    payload = {
        "version": WARMUP_VERSION,
        "model": model_kwargs,
        "warmup": {k: v for k, v in asdict(warmup).items() if k not in ("cache_dir", "context")},
        "contexts": {k: v for k, v in renderer_settings.items() if k not in unused},
        "held_out": hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


def prepare_tiny_base(
    model_kwargs: dict,
    warmup: WarmupConfig,
    context_kwargs: dict,
    held_out_problems: list[str],
    check_tokenizer: Callable[[PreTrainedTokenizerBase], None] | None = None,
) -> Path:
    """Return the cached tiny base checkpoint folder, training it first if it is not there yet.

    `held_out_problems` are never trained on, so held-out accuracy stays honest. `check_tokenizer` sees the
    base's tokenizer before any weights are trained or loaded (a separate teacher must match the student's).
    """
    # Only what shapes the base's weights keys the cache (and reaches build_tiny for the warm-up).
    ignored = ("checkpoint", "_target_", "gradient_checkpointing", "dtype", "attn_implementation")
    model_kwargs = {k: v for k, v in model_kwargs.items() if k not in ignored}
    if model_kwargs.get("tokenizer_path") is None:
        model_kwargs.pop("tokenizer_path", None)
    if not model_kwargs.get("tools"):
        model_kwargs.pop("tools", None)  # the default base keeps its cache key
    folder = (
        Path(warmup.cache_dir)
        / f"tiny-base-{warmup_fingerprint(model_kwargs, warmup, context_kwargs, held_out_problems)}"
    )
    if (folder / "config.json").is_file() and (folder / "warmup.json").is_file():
        log.info("Reusing the cached tiny base model at %s", folder)
        if check_tokenizer is not None:
            check_tokenizer(AutoTokenizer.from_pretrained(folder))
        return folder

    problems = generate_problems(
        warmup.num_examples,
        warmup.seed,
        warmup.num_steps,
        warmup.max_start,
        warmup.max_change,
        exclude=set(held_out_problems),
    )
    templates = [context_kwargs.get("student_template", ""), context_kwargs.get("teacher_template", "")]
    corpus = tokenizer_corpus(problems, templates, warmup.reference_style)
    if model_kwargs.get("tools"):
        corpus += tool_corpus(problems, tools_prompt(build_tiny_tokenizer(tools=True)))
    loaded = build_tiny(**model_kwargs, corpus=corpus)
    if check_tokenizer is not None:
        check_tokenizer(loaded.tokenizer)
    renderer = ContextRenderer(loaded.tokenizer, **context_kwargs)
    if model_kwargs.get("tools"):  # the base learns to call the calculator (models/tool_warmup.py)
        renderer = renderer.with_tools(tool_schemas())
    final_loss = train_supervised(loaded, renderer, problems, warmup)

    tmp = folder.with_name(folder.name + ".tmp")
    save_pretrained(loaded, tmp)
    (tmp / "warmup.json").write_text(
        json.dumps({"config": asdict(warmup), "final_loss": final_loss}, indent=2, default=list)
    )
    tmp.replace(folder)  # atomic: an interrupted warm-up never leaves a half-written cache entry
    log.info("Saved the tiny base model to %s", folder)
    return folder


def warmup_pair(
    problem: ArithProblem,
    renderer: ContextRenderer,
    tokenizer: PreTrainedTokenizerBase,
    rng: random.Random,
    warmup: WarmupConfig,
) -> tuple[list[int], list[int], list[bool]]:
    """One training example: (prompt ids, completion ids, completion loss mask).

    Student format: the base's own slipped solution, every token trained (it learns to slip).
    Teacher format: the same kind of slipped chain after the reference prompt, but slipped results are
    never targets: with the reference in view it learns to continue the chain it is given (as it must
    when scoring a student's tokens) and to compute each result correctly.
    """
    text, slip_spans = slipped_solution(problem, rng, warmup.slip_rate)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    completion = [*encoding["input_ids"], tokenizer.eos_token_id]
    if rng.random() < warmup.teacher_fraction:
        prompt = renderer.teacher_ids(problem.problem_text(), problem.reference_text(warmup.reference_style))
        in_slip = [
            any(a < end and start < b for a, b in slip_spans) for start, end in encoding["offset_mapping"]
        ]
        return prompt, completion, [not slipped for slipped in in_slip] + [True]
    return renderer.student_ids(problem.problem_text()), completion, [True] * len(completion)


def train_supervised(
    loaded: LoadedModel, renderer: ContextRenderer, problems: list[ArithProblem], warmup: WarmupConfig
) -> float:
    """Next-token loss on completions of both formats (see the module docstring)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    rng = random.Random(warmup.seed)
    torch.manual_seed(warmup.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=warmup.lr, weight_decay=warmup.weight_decay)

    def lr_factor(step: int) -> float:
        if step < warmup.warmup_steps:
            return (step + 1) / warmup.warmup_steps
        progress = (step - warmup.warmup_steps) / max(1, warmup.steps - warmup.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return warmup.min_lr_ratio + (1 - warmup.min_lr_ratio) * cosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    fmt = ToolFormat(tokenizer, renderer.tools, renderer.student_enable_thinking) if renderer.tools else None

    def pair(problem: ArithProblem) -> tuple[list[int], list[int], list[bool]]:
        if fmt is None:
            return warmup_pair(problem, renderer, tokenizer, rng, warmup)
        options = (warmup.teacher_fraction, warmup.slip_rate, warmup.reference_style)
        return tool_warmup_pair(problem, renderer, tokenizer, fmt, rng, *options)

    model.train()
    smoothed = float("nan")
    progress = tqdm(range(warmup.steps), desc="warm-up (tiny base)", dynamic_ncols=True)
    for _ in progress:
        examples = [pair(problem) for problem in rng.sample(problems, warmup.batch_size)]
        prompts, completions, loss_masks = (list(column) for column in zip(*examples, strict=True))
        loss = model(**sft_tensors(prompts, completions, tokenizer.pad_token_id, loss_masks)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = (
            float(loss.detach()) if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * float(loss.detach())
        )
        progress.set_postfix(loss=f"{smoothed:.3f}")
    model.eval()
    return smoothed
