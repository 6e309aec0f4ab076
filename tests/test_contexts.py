"""Prompt rendering, left padding, positions and the completion-logit alignment, on hand-built batches."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from opsd_lightning.contexts import (
    ContextRenderer,
    build_scoring_batch,
    fill_template,
    left_pad,
    position_ids_from_mask,
)
from opsd_lightning.models import QWEN3_STYLE_CHAT_TEMPLATE

from .conftest import shared_path


def test_fill_template_leaves_latex_braces_alone():
    text = fill_template("{problem} => \\boxed{} {solution}", problem="x{1}", solution="{problem}")
    assert text == "x{1} => \\boxed{} {problem}"


def test_left_pad_and_positions_on_a_hand_built_batch():
    batch = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(batch.attention_mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_scoring_batch_places_completions_right_after_each_prompt():
    prompt = left_pad([[5, 6, 7], [8]], pad_id=0)
    completion = torch.tensor([[11, 12, 2], [13, 2, 0]])  # EOS=2, then a pad
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    batch = build_scoring_batch(prompt, completion, completion_mask)
    assert batch.input_ids.tolist() == [[5, 6, 7, 11, 12, 2], [0, 0, 8, 13, 2, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]]
    # The first completion token follows the last prompt token directly: positions continue without a gap.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 2]]
    # Logits at index i predict token i+1: slice [Lp-1, Lp-1+Lc) predicts exactly the completion tokens.
    assert batch.logit_slice == slice(2, 5)
    predicted = batch.input_ids[:, batch.logit_slice.start + 1 : batch.logit_slice.stop + 1]
    assert torch.equal(predicted, completion)


def test_completion_logits_match_unpadded_single_example_forward(tiny):
    """Left padding + positions give each example the logits it would get alone (no padding at all)."""
    from opsd_lightning.algorithms.base import completion_logits

    model = tiny.model.eval()
    prompts = [[1, 40, 41, 42, 43, 44], [1, 50]]
    completions = [[60, 61, 2], [62, 2, 0]]
    prompt = left_pad(prompts, pad_id=0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    batch = build_scoring_batch(prompt, torch.tensor(completions), mask)
    with torch.no_grad():
        batched = completion_logits(model, batch)
        for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            n = int(mask[row].sum())
            alone = model(input_ids=torch.tensor([p + c[:n]])).logits[0, len(p) - 1 : len(p) - 1 + n]
            torch.testing.assert_close(batched[row, :n], alone, atol=1e-4, rtol=1e-4)


def test_renderer_uses_chat_template_and_independent_thinking_flags(tiny):
    renderer = ContextRenderer(tiny.tokenizer, student_enable_thinking=True, teacher_enable_thinking=False)
    tok = tiny.tokenizer
    student = tok.decode(renderer.student_ids("What is 2+2?"))
    teacher = tok.decode(renderer.teacher_ids("What is 2+2?", "2+2=4. \\boxed{4}"))
    assert student.startswith("<|im_start|>user\nWhat is 2+2?")
    assert student.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert teacher.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "2+2=4. \\boxed{4}" in teacher and "2+2=4" not in student


def test_tiny_template_matches_qwen3_template_for_chat_turns():
    """The tiny tokenizer's template renders what Qwen3's own template renders for system/user/assistant."""
    qwen = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "qwen3")))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    for thinking in (True, False):
        ours = qwen.apply_chat_template(
            messages,
            chat_template=QWEN3_STYLE_CHAT_TEMPLATE,
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=thinking,
        )
        theirs = qwen.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        assert ours == theirs


def test_real_qwen3_tokenizer_renders_both_contexts_as_its_template_intends():
    qwen = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "qwen3")))
    problem, solution = "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "Sum is $1$. \\boxed{1}"
    for student_thinking in (True, False):
        for teacher_thinking in (True, False):
            renderer = ContextRenderer(
                qwen, student_enable_thinking=student_thinking, teacher_enable_thinking=teacher_thinking
            )
            student_ids = renderer.student_ids(problem)
            teacher_ids = renderer.teacher_ids(problem, solution)
            expected_student = qwen.apply_chat_template(
                renderer.student_messages(problem),
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=student_thinking,
            )
            expected_teacher = qwen.apply_chat_template(
                renderer.teacher_messages(problem, solution),
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=teacher_thinking,
            )
            # Ids are the template's own tokenization, special tokens as single ids.
            assert student_ids == qwen.encode(expected_student, add_special_tokens=False)
            assert teacher_ids == qwen.encode(expected_teacher, add_special_tokens=False)
            assert student_ids[0] == qwen.convert_tokens_to_ids("<|im_start|>")
            empty_think = "<think>\n\n</think>\n\n"
            assert expected_student.endswith(empty_think) != student_thinking
            assert expected_teacher.endswith(empty_think) != teacher_thinking
            assert solution in expected_teacher and solution not in expected_student


def test_reason_first_teacher_context_holds_the_explanation_turn_then_the_follow_up(tiny):
    renderer = ContextRenderer(tiny.tokenizer)
    tok = tiny.tokenizer
    rationale_prompt = tok.decode(renderer.rationale_batch(["P?"], ["R."]).input_ids[0])
    assert "Explain the reasoning behind each step" in rationale_prompt and "R." in rationale_prompt
    teacher = tok.decode(renderer.teacher_ids("P?", "R.", rationale="First add, then subtract."))
    explain = teacher.index("Explain the reasoning")
    answer = teacher.index("<|im_start|>assistant\nFirst add, then subtract.<|im_end|>")
    follow_up = teacher.index("<|im_start|>user\nNow solve the problem yourself")
    assert explain < answer < follow_up
    assert teacher.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
    # Without a rationale the teacher context is the usual one-turn prompt.
    assert renderer.teacher_ids("P?", "R.") == renderer.teacher_ids("P?", "R.", rationale=None)
    assert "Explain" not in tok.decode(renderer.teacher_ids("P?", "R."))
