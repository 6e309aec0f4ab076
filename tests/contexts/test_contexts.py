"""Prompt rendering, the prompt budget, left padding, positions and the completion-logit alignment."""

from __future__ import annotations

import itertools

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer

from opsd_lightning._paths import config_dir
from opsd_lightning.contexts.batches import build_scoring_batch, left_pad, position_ids_from_mask
from opsd_lightning.contexts.budget import PromptBudget, fit_rows
from opsd_lightning.contexts.renderer import ContextRenderer, fill_template
from opsd_lightning.models import QWEN3_STYLE_CHAT_TEMPLATE
from tests.conftest import shared_path


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
    from opsd_lightning.models.scoring import completion_logits

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


def overlong_rows() -> list[dict[str, str]]:
    step = "Add 3 to get 7. "
    return [
        {"problem": "What is 2 + 2?", "solution": "2 + 2 = 4.", "answer": "4"},
        {"problem": "What is 4 + 3?", "solution": step * 40 + "So 7.", "answer": "7"},  # long reference
        {"problem": "What is 1 + 1? " * 40, "solution": "2.", "answer": "2"},  # long problem
    ]


def test_overlong_rows_truncate_the_reference_or_are_dropped_and_counted(tiny):
    rows = overlong_rows()
    short = ContextRenderer(tiny.tokenizer)
    limit = len(short.teacher_ids(rows[0]["problem"], rows[0]["solution"])) + 20
    assert len(short.teacher_ids(rows[1]["problem"], rows[1]["solution"])) > limit
    assert len(short.student_ids(rows[2]["problem"])) > limit

    renderer = ContextRenderer(tiny.tokenizer, max_prompt_tokens=limit)
    kept, counts = fit_rows(renderer, rows)
    assert counts == {"dropped": 1, "truncated": 1}
    assert kept[0] == rows[0]
    cut = kept[1]["solution"]
    assert rows[1]["solution"].startswith(cut) and 0 < len(cut) < len(rows[1]["solution"])
    assert len(renderer.teacher_ids(kept[1]["problem"], cut)) <= limit  # renders without raising
    # The longest prefix that fits: one more token would not.
    longer = tiny.tokenizer.encode(rows[1]["solution"], add_special_tokens=False)
    longer = tiny.tokenizer.decode(longer[: len(tiny.tokenizer.encode(cut, add_special_tokens=False)) + 1])
    assert len(short.teacher_ids(rows[1]["problem"], longer)) > limit

    dropping = ContextRenderer(tiny.tokenizer, max_prompt_tokens=limit, overlong="drop")
    dropped, counts = fit_rows(dropping, rows)
    assert dropped == rows[:1] and counts == {"dropped": 2, "truncated": 0}
    with pytest.raises(ValueError, match=r"training row 1 .*context.max_prompt_tokens=\d+"):
        fit_rows(ContextRenderer(tiny.tokenizer, max_prompt_tokens=limit, overlong="raise"), rows)
    with pytest.raises(ValueError, match="context.overlong='cut'"):
        ContextRenderer(tiny.tokenizer, max_prompt_tokens=limit, overlong="cut")
    assert fit_rows(ContextRenderer(tiny.tokenizer), rows) == (rows, {"dropped": 0, "truncated": 0})
    with pytest.raises(ValueError, match=r"a rendered prompt has \d+ tokens, over context.max_prompt_tokens"):
        renderer.student_ids(rows[2]["problem"])  # a prompt that was not fitted still raises when rendered


THINKING_FLAGS = list(itertools.product((True, False), repeat=2))


def assert_budget_measures_prompts_as_rendered(tokenizer, student_thinking: bool, teacher_thinking: bool):
    """A row whose rendered student prompt is exactly at the limit is kept, one token over is dropped, and
    the lengths the budget reports are the rendered ones, whatever the thinking flags."""
    settings = {
        "student_enable_thinking": student_thinking,
        "teacher_enable_thinking": teacher_thinking,
        "teacher_template": "{solution}",  # a short teacher prompt: the limit binds on the student's
    }
    row = {"problem": "What is 1 + 1? " * 4, "solution": "2.", "answer": "2"}
    plain = ContextRenderer(tokenizer, **settings)
    student = len(plain.student_ids(row["problem"]))
    teacher = len(plain.teacher_ids(row["problem"], row["solution"]))
    assert student > teacher

    at_limit = ContextRenderer(tokenizer, max_prompt_tokens=student, **settings)
    assert fit_rows(at_limit, [row]) == ([row], {"dropped": 0, "truncated": 0})
    over = ContextRenderer(tokenizer, max_prompt_tokens=student - 1, **settings)
    assert fit_rows(over, [row]) == ([], {"dropped": 1, "truncated": 0})
    strict = ContextRenderer(tokenizer, max_prompt_tokens=student - 1, overlong="raise", **settings)
    with pytest.raises(ValueError, match=f"a {student}-token student prompt and a {teacher}-token teacher"):
        fit_rows(strict, [row])


@pytest.mark.parametrize(("student_thinking", "teacher_thinking"), THINKING_FLAGS)
def test_prompt_budget_measures_with_the_renderers_thinking_flags(tiny, student_thinking, teacher_thinking):
    assert_budget_measures_prompts_as_rendered(tiny.tokenizer, student_thinking, teacher_thinking)


@pytest.mark.parametrize(("student_thinking", "teacher_thinking"), THINKING_FLAGS)
def test_prompt_budget_measures_real_qwen3_prompts_as_rendered(student_thinking, teacher_thinking):
    qwen = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "qwen3")))
    assert_budget_measures_prompts_as_rendered(qwen, student_thinking, teacher_thinking)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"overlong": "cut"}, "context.overlong='cut': use one of"),
        ({"max_prompt_tokens": 0}, r"context.max_prompt_tokens=0 must be an integer >= 1 \(or null\)"),
        ({"max_prompt_tokens": 1.5}, "context.max_prompt_tokens=1.5 must be an integer"),
        ({"max_prompt_tokens": True}, "context.max_prompt_tokens=True must be an integer"),
    ],
)
def test_prompt_budget_checks_its_range_on_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        PromptBudget(**settings)


def test_a_bare_renderer_renders_the_configured_default_context(tiny):
    """The default prompts are stated in conf/context/default.yaml only; the renderer reads them there."""
    with initialize_config_dir(str(config_dir()), version_base=None):
        settings = compose("train").context
    configured, bare = ContextRenderer(tiny.tokenizer, **settings), ContextRenderer(tiny.tokenizer)
    names = ("student_template", "teacher_template", "rationale_template", "rationale_followup")
    names += ("system_prompt", "student_enable_thinking", "teacher_enable_thinking", "budget")
    assert {n: getattr(bare, n) for n in names} == {n: getattr(configured, n) for n in names}
    # The teacher's transition and reason-first's follow-up turn read alike; each is written out whole.
    assert bare.teacher_template.endswith("behind each step. " + bare.rationale_followup)


def assert_spliced_ids_equal_the_text_rendering(tokenizer) -> None:
    """Solution ids spliced between the template's two sides give the text rendering's ids exactly, when no
    token spans a seam (the solution starts with a letter and ends with a digit)."""
    problem, solution = "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "Sum is $1$, so the answer is 1"
    for thinking in (True, False):
        renderer = ContextRenderer(tokenizer, teacher_enable_thinking=thinking, system_prompt="Be brief.")
        solution_ids = tokenizer.encode(solution, add_special_tokens=False)
        spliced = renderer.teacher_ids_spliced(problem, solution_ids)
        assert spliced == renderer.teacher_ids(problem, solution)
        prefix, suffix = renderer.teacher_sides(problem)
        assert spliced == prefix + solution_ids + suffix and len(prefix) > 5 and len(suffix) > 5


def test_spliced_teacher_ids_equal_the_text_rendering_on_the_tiny_tokenizer(tiny):
    assert_spliced_ids_equal_the_text_rendering(tiny.tokenizer)


def test_spliced_teacher_ids_equal_the_text_rendering_on_the_real_qwen3_tokenizer():
    qwen = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "qwen3")))
    assert_spliced_ids_equal_the_text_rendering(qwen)


def test_spliced_solution_ids_stay_verbatim_and_obey_the_prompt_budget(tiny):
    """Ids that no text encoding would produce (a word split into single characters) stay as they are;
    over the budget the solution's tail is cut (truncate_solution) or the prompt raises."""
    tok = tiny.tokenizer
    odd_ids = [tok.convert_tokens_to_ids(ch) for ch in "seventeen"]
    assert odd_ids != tok.encode("seventeen", add_special_tokens=False)
    prefix, suffix = ContextRenderer(tok).teacher_sides("What is 10 + 7?")
    full = len(prefix) + len(odd_ids) + len(suffix)
    assert ContextRenderer(tok).teacher_ids_spliced("What is 10 + 7?", odd_ids) == prefix + odd_ids + suffix
    cut = ContextRenderer(tok, max_prompt_tokens=full - 3).teacher_ids_spliced("What is 10 + 7?", odd_ids)
    assert cut == prefix + odd_ids[:-3] + suffix
    with pytest.raises(ValueError, match="over context.max_prompt_tokens"):
        ContextRenderer(tok, max_prompt_tokens=full - 3, overlong="drop").teacher_ids_spliced(
            "What is 10 + 7?", odd_ids
        )
    with pytest.raises(ValueError, match="holds the solution 2 times"):
        ContextRenderer(tok, teacher_template="{problem} {solution} {solution}").teacher_sides("x")
