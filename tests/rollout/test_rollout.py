"""Rollout masks (EOS included, after-EOS masked, truncation), seeding and mode handling."""

from __future__ import annotations

import pytest
import torch

from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.models import eos_token_ids
from opsd_lightning.rollout import SamplingConfig, completion_mask_from_ids, generate_rollouts


def test_completion_mask_keeps_eos_and_drops_everything_after():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0], [9, 3, 2, 0]])
    mask, truncated = completion_mask_from_ids(ids, eos_ids=[2, 3])
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
        [True, True, False, False],
    ]
    assert truncated.tolist() == [False, True, False, False]


def test_sampling_config_validates_its_fields():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    assert SamplingConfig(temperature=0).generate_kwargs()["do_sample"] is False


def test_rollouts_are_seeded_and_restore_train_mode(tiny):
    model, tok = tiny.model, tiny.tokenizer
    prompt = ContextRenderer(tok).student_batch(["Ava has 3 apples.", "Ben has 12 coins. How many?"])
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12)
    model.train()
    first = generate_rollouts(model, prompt, sampling, eos_token_ids(model, tok), tok.pad_token_id, seed=7)
    assert model.training
    second = generate_rollouts(model, prompt, sampling, eos_token_ids(model, tok), tok.pad_token_id, seed=7)
    other = generate_rollouts(model, prompt, sampling, eos_token_ids(model, tok), tok.pad_token_id, seed=8)
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    # Pads after EOS are never trained on; a row without EOS within the budget is flagged truncated.
    assert first.completion_ids.shape[1] <= 12
    assert (first.completion_ids[~first.completion_mask] == tok.pad_token_id).all()
    assert torch.equal(
        first.truncated, ~torch.isin(first.completion_ids, torch.tensor([tok.eos_token_id])).any(1)
    )
