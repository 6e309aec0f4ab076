"""Sampling: the top-k/top-p filter against HF's warpers, the engine dtype, HF generation without a
checkpoint's own settings, and `rollout=vllm` against `rollout=hf` on a tiny Qwen3 with head dimension 32:
top_k=1 and a tiny top_p decode greedily, the first token's distribution at T=1 (plain, and with top-k +
top-p through our processor) is HF's softmax by a chi-square test, and the sampler log-probs are HF's.

The vLLM tests share one engine (starting one costs seconds) and skip without vLLM.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from opsd_lightning.contexts.batches import left_pad
from opsd_lightning.models import build_tiny, eos_token_ids, load_pretrained, save_pretrained
from opsd_lightning.rollout import SamplingConfig, generate_rollouts
from opsd_lightning.rollout.core import top_k_top_p_filter
from opsd_lightning.rollout.vllm import engine_dtype
from tests.conftest import VLLM_TINY_SHAPE

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
PROMPT = [5, 6, 7, 8]


@pytest.mark.parametrize(("top_k", "top_p"), [(20, 0.95), (5, 0.5), (1, 0.9), (0, 0.8), (50, 1.0), (0, 1.0)])
def test_the_filter_keeps_the_tokens_hf_keeps(top_k, top_p):
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(top_k)) * 3
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    kept = top_k_top_p_filter(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(kept), torch.isfinite(expected))
    assert torch.equal(kept[torch.isfinite(kept)], logits[torch.isfinite(kept)])


def test_per_row_filters_equal_one_row_at_a_time():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 3
    settings = [(20, 0.95), (3, 0.5), (100, 0.99)]
    top_k, top_p = torch.tensor([k for k, _ in settings]), torch.tensor([p for _, p in settings])
    rows = [top_k_top_p_filter(logits[row : row + 1], k, p) for row, (k, p) in enumerate(settings)]
    assert torch.equal(top_k_top_p_filter(logits, top_k, top_p), torch.cat(rows))


@pytest.mark.parametrize(
    ("dtype", "precision", "parameters", "expected"),
    [
        (None, "bf16-mixed", torch.float32, "bfloat16"),
        (None, "16-mixed", torch.float32, "float16"),
        (None, "32-true", torch.float32, "float32"),
        (None, "bf16-true", torch.bfloat16, "bfloat16"),
        (None, None, torch.float32, "float32"),  # opsd-eval: no trainer
        ("float32", "bf16-mixed", torch.float32, "float32"),  # rollout.dtype wins
    ],
)
def test_the_engine_dtype_follows_the_trainer_precision(dtype, precision, parameters, expected):
    assert engine_dtype(dtype, precision, parameters) == expected


def test_hf_generation_ignores_a_checkpoints_generation_settings(tmp_path):
    loaded = build_tiny(**VLLM_TINY_SHAPE, seed=3)
    loaded.model.generation_config.repetition_penalty = 2.0
    loaded.model.generation_config.no_repeat_ngram_size = 1
    folder = save_pretrained(loaded, tmp_path / "ckpt")
    assert '"repetition_penalty": 2.0' in (folder / "generation_config.json").read_text()
    reloaded = load_pretrained(str(folder), dtype="float32", attn_implementation=None)
    assert reloaded.model.generation_config.repetition_penalty in (None, 1.0)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=12)
    pad = reloaded.tokenizer.pad_token_id
    rollout = generate_rollouts(reloaded.model, left_pad([PROMPT], pad), sampling, [], pad)
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(12):  # plain greedy decoding, one argmax at a time
            ids.append(int(reloaded.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert rollout.completion_ids[0].tolist() == ids[len(PROMPT) :]
    # A random tiny model repeats itself, so a repetition penalty would have changed this completion.
    assert len(set(ids[len(PROMPT) :])) < 12


# ---- vLLM against HF -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    from opsd_lightning.rollout import VLLMEngine

    return VLLMEngine(
        kv_cache_memory_bytes=64 * 2**20, max_num_seqs=256, max_model_len=256, enforce_eager=True
    )


@pytest.fixture(scope="module")
def model():
    return build_tiny(**VLLM_TINY_SHAPE, seed=4)


def vllm_rollout(engine, loaded, prompts, sampling, seed=0):
    eos, pad = eos_token_ids(loaded.model, loaded.tokenizer), loaded.tokenizer.pad_token_id
    return engine.generate(loaded.model, left_pad(prompts, pad), sampling, eos, pad, seed)


def hf_greedy(loaded, prompts, max_new_tokens):
    eos, pad = eos_token_ids(loaded.model, loaded.tokenizer), loaded.tokenizer.pad_token_id
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    return generate_rollouts(loaded.model, left_pad(prompts, pad), greedy, eos, pad)


def first_token_logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(torch.tensor([PROMPT])).logits[0, -1].float()


@needs_vllm
@pytest.mark.parametrize(
    ("top_k", "top_p"),
    [(1, 1.0), (0, 1e-6), (5, 1e-6)],  # vLLM's top-k; vLLM's top-p; top-p within top-k by our processor
)
def test_top_k_1_and_a_tiny_top_p_decode_greedily(engine, model, top_k, top_p):
    prompts = [PROMPT, [9, 10, 11], [12, 13]]
    sampling = SamplingConfig(temperature=1.5, top_k=top_k, top_p=top_p, max_new_tokens=10)
    sampled = vllm_rollout(engine, model, prompts * 4, sampling)
    assert sampled.completion_ids.tolist() == hf_greedy(model, prompts * 4, 10).completion_ids.tolist()
    # One token had all the mass, so its sampler log-probability is 0.
    assert float(sampled.sampler_logprobs[sampled.completion_mask].abs().max()) < 1e-5


@needs_vllm
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (8, 0.8)])
def test_the_first_tokens_distribution_is_hfs_softmax(engine, model, top_k, top_p):
    """4,000 one-token samples at T=1 (seeded: the same counts on every run) against the HF model's
    probabilities, filtered by HF's own warpers. Categories expected at least 5 times are tested one by one,
    the rest pooled; a test at significance 1e-3. A sampler that ignored top-k/top-p, or a temperature,
    would fail it by far (the top-8 cut alone moves a few hundred samples)."""
    samples = 4000
    sampling = SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p, max_new_tokens=1)
    tokens = vllm_rollout(engine, model, [PROMPT] * samples, sampling, seed=7).completion_ids[:, 0]
    logits = first_token_logits(model)[None]
    if top_k:
        logits = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, logits))
    probs = torch.softmax(logits[0].double(), dim=-1)
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    assert float(counts[probs == 0].sum()) == 0, "sampled a token outside the top-k/top-p set"
    expected = probs * samples
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    statistic, p_value = chisquare(observed[keep].numpy(), expected[keep].numpy())
    assert int(big.sum()) >= 5, "too few categories for the test to mean anything"
    assert p_value > 1e-3, (statistic, p_value)


@needs_vllm
def test_sampler_logprobs_are_the_probabilities_that_generated_each_token(engine, model):
    sampling = SamplingConfig(temperature=1.1, top_k=20, top_p=0.95, max_new_tokens=6)
    rollout = vllm_rollout(engine, model, [PROMPT, [9, 10, 11]], sampling, seed=3)
    assert rollout.sampler_logprobs.shape == rollout.completion_ids.shape
    pad = model.tokenizer.pad_token_id
    prompt = left_pad([PROMPT, [9, 10, 11]], pad)
    ids = torch.cat([prompt.input_ids, rollout.completion_ids], dim=1)
    mask = torch.cat([prompt.attention_mask, rollout.completion_mask.long()], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    completion_logits = logits[:, prompt.input_ids.shape[1] - 1 : -1]
    expected = sampling.sampling_log_probs(completion_logits, rollout.completion_ids)
    valid = rollout.completion_mask
    # fp32 engines: logits agree to ~1e-5, so log-probabilities to far better than 1e-3.
    assert torch.allclose(rollout.sampler_logprobs[valid], expected[valid], atol=1e-3)
    assert bool((rollout.sampler_logprobs[~valid] == 0).all())


@needs_vllm
def test_greedy_rollouts_report_no_sampler_logprobs(engine, model):
    assert (
        vllm_rollout(
            engine, model, [PROMPT], SamplingConfig(temperature=0.0, max_new_tokens=3)
        ).sampler_logprobs
        is None
    )


@needs_vllm
def test_a_grpo_step_on_vllm_measures_no_gap_between_fp32_engines(engine, model):
    """The sampler log-probs reach the policy term aligned with the trainer's: with the same fp32 weights the
    gap is numerical noise and the importance ratio 1, while rollout=hf logs none of it."""
    from opsd_lightning.objectives import ClippedPolicy
    from opsd_lightning.rollout import HFEngine
    from opsd_lightning.rollout.samplers import GroupSampler
    from tests.conftest import policy_module
    from tests.training.test_hybrid import one_step, train_batch

    sampling = {"temperature": 1.1, "top_k": 20, "top_p": 0.95, "max_new_tokens": 8}

    def stats(rollout_engine) -> dict:
        term = ClippedPolicy(sampling=sampling)
        module = policy_module(
            model, [term], GroupSampler(group_size=2), sampling=sampling, engine=rollout_engine
        )
        return one_step(module, train_batch(2))["stats"]

    measured = stats(engine)
    assert measured["sampler_tokens_outside_trainer_set"] == 0
    assert measured["sampler_logprob_gap"] < 1e-3  # fp32 logits agree to ~1e-5
    assert abs(measured["importance_ratio"] - 1) < 1e-3
    assert "sampler_logprob_gap" not in stats(HFEngine())
