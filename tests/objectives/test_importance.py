"""The policy term's truncated importance sampling against the engine's sampler log-probs: a ratio of exactly
1 when sampler and trainer agree (the loss is the uncorrected one, bit for bit), pinned numbers for a
hand-made gap, a token outside the trainer's top-k, and the mismatch statistics it reports."""

from __future__ import annotations

import math

import pytest
import torch

from opsd_lightning.contexts.batches import left_pad
from opsd_lightning.objectives import ClippedPolicy, TermInputs
from opsd_lightning.objectives.terms import truncated_importance_ratio
from opsd_lightning.rollout import SamplingConfig
from opsd_lightning.rollout.episodes import Episodes

# No top-k/top-p, so the hand-written tokens below all have a finite log-probability under the trainer.
SAMPLING = SamplingConfig(temperature=1.1, top_p=1.0, top_k=0, max_new_tokens=4)


def episodes(tiny, sampler_logprobs=None) -> Episodes:
    """Two rows (one group) of hand-written completions, the second one token shorter, advantages ±1."""
    prompt = left_pad([[5, 6, 7], [8, 9]], tiny.tokenizer.pad_token_id)
    completion_ids = torch.tensor([[11, 12, 13], [14, 15, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return Episodes(
        prompt,
        completion_ids,
        mask,
        mask,
        torch.zeros(2, dtype=torch.bool),
        problems=["p"],
        solutions=[None],
        answers=["1"],
        group_size=2,
        advantages=torch.tensor([1.0, -1.0]),
        sampler_logprobs=sampler_logprobs,
    )


def policy_loss(tiny, term: ClippedPolicy, sampler_logprobs=None):
    result = term(TermInputs(tiny.model, episodes(tiny, sampler_logprobs)))
    return result.loss_sum, result.sums


def trainer_sampling_logp(tiny) -> torch.Tensor:
    with torch.no_grad():
        inputs = TermInputs(tiny.model, episodes(tiny, torch.zeros(2, 3)))
        return inputs.sampling_token_logp(SAMPLING)


def test_the_ratio_of_truncated_importance_sampling_by_hand():
    trainer = torch.tensor([-1.0, -2.0, -0.5])
    sampler = torch.tensor([-1.5, -1.0, -3.0])
    ratio = truncated_importance_ratio(trainer, sampler, cap=2.0)
    assert ratio.tolist() == pytest.approx([math.exp(0.5), math.exp(-1.0), 2.0], rel=1e-6)


def test_a_sampler_that_agrees_with_the_trainer_gives_ratio_one_and_the_uncorrected_loss(tiny):
    term = ClippedPolicy(sampling=SAMPLING)
    plain, plain_sums = policy_loss(tiny, term)
    assert plain_sums == {}  # no sampler log-probs (rollout=hf): nothing measured, nothing corrected
    corrected, sums = policy_loss(tiny, term, trainer_sampling_logp(tiny))
    assert torch.equal(corrected, plain)
    assert sums == {
        "sampler_logprob_gap": 0.0,
        "sampler_kl": 0.0,
        "sampler_tokens_outside_trainer_set": 0.0,
        "importance_ratio": 5.0,  # 5 tokens
    }


def test_a_hand_made_gap_scales_each_tokens_loss_by_its_truncated_ratio(tiny):
    trainer = trainer_sampling_logp(tiny)
    # The sampler rated row 0's tokens 0.5 higher (ratio e^-0.5) and row 1's 1.0 lower (ratio e^1 > cap 2).
    gap = torch.tensor([[0.5, 0.5, 0.5], [-1.0, -1.0, 0.0]])
    term = ClippedPolicy(sampling=SAMPLING, importance_cap=2.0)
    corrected, sums = policy_loss(tiny, term, trainer + gap)
    # With one update per rollout the surrogate's value is -A per token: row 0 (A=1) 3 tokens, row 1 (A=-1) 2.
    assert float(corrected.detach()) == pytest.approx(-3 * math.exp(-0.5) + 2 * 2.0, rel=1e-5)
    assert sums["sampler_logprob_gap"] == pytest.approx(3 * 0.5 + 2 * 1.0, rel=1e-5)
    assert sums["sampler_kl"] == pytest.approx(3 * 0.5 - 2 * 1.0, abs=1e-5)
    assert sums["importance_ratio"] == pytest.approx(3 * math.exp(-0.5) + 2 * 2.0, rel=1e-5)
    uncorrected, _ = policy_loss(
        tiny, ClippedPolicy(sampling=SAMPLING, importance_correction=False), trainer + gap
    )
    assert float(uncorrected.detach()) == pytest.approx(-3 + 2, abs=1e-6)  # measured, not applied


def test_a_token_outside_the_trainers_top_k_gets_ratio_zero_and_is_counted(tiny):
    top_1 = SamplingConfig(temperature=1.1, top_k=1, max_new_tokens=4)
    with torch.no_grad():
        inputs = TermInputs(tiny.model, episodes(tiny, torch.zeros(2, 3)))
        trainer = inputs.sampling_token_logp(top_1)
    outside = torch.isinf(trainer) & episodes(tiny).loss_mask
    assert 0 < int(outside.sum()) <= 5 and bool((trainer[~torch.isinf(trainer)] == 0).all())  # top-1: q = 1
    _, sums = policy_loss(tiny, ClippedPolicy(sampling=top_1), torch.full((2, 3), -0.25))
    assert sums["sampler_tokens_outside_trainer_set"] == float(outside.sum())
    inside = 5 - float(outside.sum())
    assert sums["importance_ratio"] == pytest.approx(inside * math.exp(0.25), rel=1e-6)
    assert sums["sampler_logprob_gap"] == pytest.approx(inside * 0.25, rel=1e-6)


def test_bad_importance_options_name_the_option(tiny):
    with pytest.raises(ValueError, match="algorithm.importance_cap=0"):
        ClippedPolicy(importance_cap=0)
    with pytest.raises(ValueError, match=r"sampling=\$\{algorithm.sampling\}"):
        policy_loss(tiny, ClippedPolicy(), torch.zeros(2, 3))
