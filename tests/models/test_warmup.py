"""The tiny base's warm-up: slipped results are masked for the teacher format, the cache is reused."""

from __future__ import annotations

import random

import torch

from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.data.arith import ArithProblem, generate_examples, make_problem, slipped_solution
from opsd_lightning.models.warmup import WarmupConfig, prepare_tiny_base, sft_tensors, warmup_pair

SMALL_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


def test_solution_with_slips_marks_the_wrong_results():
    problem = ArithProblem("Ava", "apples", 7, (5, -3), ("buys 5 more", "loses 3"))
    assert problem.solution_text() == (
        "Ava starts with 7 apples. 7 + 5 = 12. 12 - 3 = 9. The answer is \\boxed{9}."
    )
    text, spans = problem.solution_with_slips([2, 0])
    assert text == "Ava starts with 7 apples. 7 + 5 = 14. 14 - 3 = 11. The answer is \\boxed{11}."
    assert [text[a:b] for a, b in spans] == ["14"]  # 14 - 3 = 11 is right, given the chain


def test_sft_tensors_label_only_unmasked_completion_tokens():
    tensors = sft_tensors(
        [[5, 6], [7]], [[8, 9, 2], [10, 2]], pad_id=0, completion_loss_masks=[[1, 0, 1], [1, 1]]
    )
    assert tensors["input_ids"].tolist() == [[5, 6, 8, 9, 2], [0, 0, 7, 10, 2]]
    assert tensors["labels"].tolist() == [[-100, -100, 8, -100, 2], [-100, -100, -100, 10, 2]]
    assert tensors["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]  # left pads take 0


def test_teacher_format_never_trains_on_slipped_digits(tiny):
    renderer = ContextRenderer(tiny.tokenizer)
    config = WarmupConfig(teacher_fraction=1.0, slip_rate=1.0)
    rng = random.Random(0)
    problem = make_problem(random.Random(1), 2, 12, 6)
    prompt, completion, mask = warmup_pair(problem, renderer, tiny.tokenizer, rng, config)
    text, spans = slipped_solution(problem, random.Random(0), 1.0)  # the same draw as inside warmup_pair
    masked_text = tiny.tokenizer.decode([t for t, keep in zip(completion, mask, strict=True) if not keep])
    assert masked_text == "".join(text[a:b] for a, b in spans)
    assert mask[-1] and completion[-1] == tiny.tokenizer.eos_token_id


def test_prepare_tiny_base_trains_once_and_reuses_the_cache(tmp_path):
    held_out = [row["problem"] for row in generate_examples(4, 1)]
    config = WarmupConfig(cache_dir=str(tmp_path), num_examples=64, steps=3, batch_size=4)
    folder = prepare_tiny_base(SMALL_MODEL, config, {}, held_out)
    assert (folder / "config.json").is_file() and (folder / "warmup.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare_tiny_base(SMALL_MODEL, config, {}, held_out) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    other = prepare_tiny_base(SMALL_MODEL, WarmupConfig(**{**config.__dict__, "steps": 4}), {}, held_out)
    assert other != folder  # a different recipe is a different cache entry

    from opsd_lightning.models import load_pretrained

    loaded = load_pretrained(str(folder), dtype="float32")
    assert loaded.tokenizer.chat_template and loaded.model.config.hidden_size == 32
    assert torch.isfinite(loaded.model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
