"""Multi-turn episodes: a two-call episode's completion and loss mask position by position, the counts, and
the teacher's and the student's logits aligned on every supervised token.

The engine here replays scripted turns (a random tiny model does not write tool calls); it honours the
interface as the real engines do: it stops a row at its first stop id and pads after it.
"""

from __future__ import annotations

import torch

from opsd_lightning.contexts.batches import TokenBatch, build_scoring_batch
from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.environments.base import ArithToolsEnvironment
from opsd_lightning.models import build_tiny
from opsd_lightning.models.scoring import completion_logits
from opsd_lightning.rollout import Rollout, SamplingConfig
from opsd_lightning.rollout.multi_turn import MultiTurnSampler
from opsd_lightning.rollout.samplers import RolloutSource

CALL = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{}"}}}}\n</tool_call>'
RESPONSE = (
    "<|im_end|>\n<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    "<think>\n\n</think>\n\n"
)
# The episode, segment by segment, each with whether the model wrote it (supervised) or the environment did.
SEGMENTS = [
    ("First 2+3.\n" + CALL.format("2+3"), True),
    (RESPONSE.format("5"), False),
    (CALL.format("5*x"), True),  # an error: the model reads it and goes on
    (RESPONSE.format("error: only numbers and + - * / // % ** ( ) are allowed, not Name"), False),
    (CALL.format("5*4"), True),
    (RESPONSE.format("20"), False),
    ("So \\boxed{20}<|im_end|>", True),
]


class ScriptedEngine:
    """Each call, each live row gets its next scripted turn (ids), cut at the first stop id."""

    def __init__(self, turns: list[list[list[int]]]) -> None:
        self.turns, self.calls = turns, 0

    def generate(self, model, prompt: TokenBatch, sampling, stop_ids, pad_id, seed) -> Rollout:
        rows = [self.turns[row].pop(0) for row in range(len(self.turns)) if self.turns[row]]
        assert len(rows) == len(prompt.input_ids)  # only live episodes are generated
        self.calls += 1
        cut = [ids[: next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))] for ids in rows]
        cut = [ids[: sampling.max_new_tokens] for ids in cut]
        width = max(len(ids) for ids in cut)
        out = torch.full((len(cut), width), pad_id)
        mask = torch.zeros((len(cut), width), dtype=torch.bool)
        for row, ids in enumerate(cut):
            out[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), True
        truncated = torch.tensor([not ids or ids[-1] not in stop_ids for ids in cut])
        return Rollout(out, mask, truncated, 0.0)


def run_episodes(turns_text: list[list[str]], max_new_tokens: int = 400, max_turns: int = 4):
    loaded = build_tiny(
        hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, tools=True
    )
    tokenizer = loaded.tokenizer
    sampler = MultiTurnSampler(ArithToolsEnvironment(max_turns=max_turns))
    contexts = sampler.contexts_for(ContextRenderer(tokenizer))
    engine = ScriptedEngine([[tokenizer.encode(t) for t in turns] for turns in turns_text])
    eos = [tokenizer.eos_token_id]
    sampling = SamplingConfig(temperature=0, max_new_tokens=max_new_tokens)

    def generate_with(prompt, settings, stop_ids, seed):
        return engine.generate(loaded.model, prompt, settings, stop_ids, tokenizer.pad_token_id, seed)

    source = RolloutSource(
        contexts,
        tokenizer,
        eos,
        torch.device("cpu"),
        None,
        lambda r: int(r.completion_mask.sum()),
        sampling,
        generate_with,
    )
    batch = {
        "problem": ["Add 2 and 3, then times 4."] * len(turns_text),
        "solution": ["2+3=5, 5*4=20"] * len(turns_text),
        "answer": ["20"] * len(turns_text),
    }
    return loaded, contexts, sampler, sampler.sample(batch, source, seed=0), engine


def two_call_script() -> list[str]:
    # What the model writes each turn: the supervised segments between the environment's responses.
    text = [s for s, by_model in SEGMENTS if by_model]
    return text


def test_two_call_episode_mask_position_by_position() -> None:
    loaded, _, sampler, episodes, engine = run_episodes([two_call_script()])
    tokenizer = loaded.tokenizer
    expected_ids = [i for s, _ in SEGMENTS for i in tokenizer.encode(s)]
    expected_mask = [m for s, by_model in SEGMENTS for m in [by_model] * len(tokenizer.encode(s))]
    assert episodes.completion_ids[0].tolist() == expected_ids
    assert episodes.loss_mask[0].tolist() == expected_mask
    assert episodes.completion_mask[0].all() and not episodes.truncated[0]
    assert engine.calls == 4
    assert episodes.stats == {"tool_calls": 3.0, "tool_errors": 1.0, "turns": 4.0}
    assert [c.response for c in sampler.traces[0].calls][::2] == ["5", "20"]


def test_episode_is_what_the_template_renders_for_the_conversation() -> None:
    loaded, contexts, _, episodes, _ = run_episodes([two_call_script()])
    tokenizer = loaded.tokenizer
    prompt = contexts.student_ids("Add 2 and 3, then times 4.")
    full = tokenizer.decode(prompt + episodes.completion_ids[0].tolist())
    rendered = tokenizer.apply_chat_template(
        contexts.student_messages("Add 2 and 3, then times 4."),
        tools=contexts.tools,
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert full.startswith(rendered) and full.endswith("So \\boxed{20}<|im_end|>")
    assert full.count("<tool_response>") == 3


def test_limits_truncate_and_count() -> None:
    # Second row: turn limit reached with a call still open -> truncated; third: budget ran out mid-turn.
    script = two_call_script()
    _, _, _, episodes, _ = run_episodes(
        [script[:1] + ["\\boxed{5}<|im_end|>"], script[:3], ["x" * 50]], max_new_tokens=120, max_turns=2
    )
    assert episodes.truncated.tolist() == [False, True, True]
    assert episodes.stats["turns"] == (2 + 2 + 1) / 3


def test_teacher_and_student_logits_align_on_every_supervised_token() -> None:
    # Two episodes of different lengths in one batch: both views are padded (prompts left, completions right).
    short = ["\\boxed{5}<|im_end|>"]
    loaded, contexts, _, episodes, _ = run_episodes([two_call_script(), short])
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    teacher = contexts.teacher_batch(episodes.problems, ["2+3=5, 5*4=20"] * 2)
    assert "calculator" in tokenizer.decode(teacher.input_ids[0])  # the teacher sees the tools too
    ids, mask = episodes.completion_ids, episodes.completion_mask
    with torch.no_grad():
        for prompt in (episodes.prompt, teacher):
            logits = completion_logits(model, build_scoring_batch(prompt, ids, mask))
            for row in range(2):
                prompt_ids = prompt.input_ids[row][prompt.attention_mask[row].bool()].tolist()
                completion = ids[row][mask[row]].tolist()
                # The example alone, unpadded: position len(prompt) - 1 + j predicts completion token j.
                alone = model(torch.tensor([prompt_ids + completion])).logits[0, len(prompt_ids) - 1 :]
                supervised = episodes.loss_mask[row].nonzero().flatten()
                assert len(supervised) > 0
                # Same inputs, same positions: equal up to fp32 reordering (logits of magnitude ~1 here).
                torch.testing.assert_close(logits[row, supervised], alone[supervised], rtol=0, atol=1e-4)
    assert int(episodes.loss_mask[0].sum()) < int(mask[0].sum())  # the environment's tokens were left out
