"""The whole OPSD loop on a tiny model: a few real Lightning steps change the student and leave the
fixed teacher untouched; the loss is a token mean over the whole optimizer step."""

from __future__ import annotations

import functools
import warnings

import lightning as L
import pytest
import torch

from opsd_lightning.contexts.teacher import ReasonFirstContext
from opsd_lightning.data import ArithDataModule
from opsd_lightning.objectives import ReverseKL
from opsd_lightning.objectives.settings import LossSettings
from opsd_lightning.teachers.modes import EMATeacher, FixedTeacher
from opsd_lightning.training.module import OnPolicyModule
from tests.conftest import distill_sum, opsd_module, quiet_trainer, sample


def make_module(loaded, teacher, divergence=None, **kwargs) -> OnPolicyModule:
    return opsd_module(
        loaded,
        divergence=divergence,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        teacher=teacher,
        evaluation={"sampling": {"temperature": 0.0, "max_new_tokens": 6}, "num_samples": 1},
        **kwargs,
    )


def fit(module, steps: int, tmp_path, batch_size: int = 2) -> L.Trainer:
    trainer = quiet_trainer(tmp_path, max_steps=steps)
    data = ArithDataModule(train_size=16, val_size=4, batch_size=batch_size, seed=0)
    trainer.fit(module, datamodule=data)
    return trainer


def test_fit_changes_the_student_and_leaves_the_fixed_teacher_untouched(fresh_tiny, tmp_path):
    before = {k: v.clone() for k, v in fresh_tiny.model.state_dict().items()}
    module = make_module(fresh_tiny, FixedTeacher())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(module, steps=3, tmp_path=tmp_path)
    assert trainer.global_step == 3
    # The student trains in train mode; the frozen teacher stays in eval, without Lightning's warning.
    assert fresh_tiny.model.training and not module.teacher.frozen.training
    assert not [w for w in caught if "in eval mode" in str(w.message)]
    after_student = fresh_tiny.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after_student[k])]
    assert len(changed) > len(before) // 2, "the student should move"
    for key, value in module.teacher.frozen.state_dict().items():
        assert torch.equal(value, before[key]), f"fixed teacher weight {key} changed"
    assert module.generated_tokens > 0
    assert "train/loss" in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_ema_teacher_moves_towards_the_student(fresh_tiny, tmp_path):
    initial = {k: v.clone() for k, v in fresh_tiny.model.named_parameters()}
    module = make_module(fresh_tiny, EMATeacher(decay=0.5), divergence=ReverseKL())
    fit(module, steps=2, tmp_path=tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    ema, live, start = (
        module.teacher.shadow[name.replace(".", "__")],
        dict(fresh_tiny.model.named_parameters())[name],
        initial[name],
    )
    assert not torch.equal(ema, start) and not torch.equal(ema, live)


def test_loss_is_a_token_mean_over_the_whole_accumulation_window(fresh_tiny, tmp_path, monkeypatch):
    """Two micro-batches of different token counts: the step's gradient is sum(loss)/sum(tokens)."""
    module = make_module(fresh_tiny, FixedTeacher(), accumulate_grad_batches=2, gradient_clip_val=None)
    seen = []
    original = module.micro_batch_loss

    def recording(batch, micro_index):
        result = original(batch, micro_index)
        seen.append((float(result.loss_sum), float(result.num_tokens)))
        return result

    monkeypatch.setattr(module, "micro_batch_loss", recording)
    trainer = fit(module, steps=1, tmp_path=tmp_path)
    assert trainer.global_step == 1 and len(seen) == 2
    expected = sum(s for s, _ in seen) / sum(n for _, n in seen)
    torch.testing.assert_close(float(trainer.callback_metrics["train/loss"]), expected, rtol=1e-5, atol=1e-6)


def test_lora_fit_trains_only_adapters_and_the_fixed_teacher_is_the_base(fresh_tiny, tmp_path):
    from opsd_lightning.models.lora import apply_peft

    probe = torch.tensor([[1, 20, 21, 22, 23]])
    with torch.no_grad():
        base_logits = fresh_tiny.model(input_ids=probe).logits
    fresh_tiny.model = apply_peft(
        fresh_tiny.model,
        {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    )
    base_weights = {k: v.clone() for k, v in fresh_tiny.model.named_parameters() if "lora_" not in k}
    module = make_module(fresh_tiny, FixedTeacher())
    fit(module, steps=3, tmp_path=tmp_path)
    for name, param in fresh_tiny.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_weights[name]), f"base weight {name} moved"
    lora_b = [p for n, p in fresh_tiny.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "adapters should have trained"
    fresh_tiny.model.eval()
    with torch.no_grad():
        with module.teacher.scoring(fresh_tiny.model) as teacher:
            torch.testing.assert_close(teacher.model(input_ids=probe).logits, base_logits)
        student_logits = fresh_tiny.model(input_ids=probe).logits
    assert not torch.allclose(student_logits, base_logits)


def test_truncated_rollouts_are_counted_and_can_be_masked(fresh_tiny, tmp_path):
    """A 2-token budget truncates every rollout of a random model: with mask_truncated nothing is trained."""
    module = make_module(fresh_tiny, FixedTeacher(), mask_truncated=True)
    module.sampling.max_new_tokens = 2
    before = {k: v.clone() for k, v in fresh_tiny.model.state_dict().items()}
    trainer = fit(module, steps=1, tmp_path=tmp_path)
    metrics = trainer.callback_metrics
    assert float(metrics["train/truncation_rate"]) == 1.0
    assert float(metrics["train/trained_tokens"]) == 0.0
    assert float(metrics["train/generated_tokens_total"]) == 4.0  # 2 rollouts x 2 tokens, still counted
    assert all(torch.equal(v, before[k]) for k, v in fresh_tiny.model.state_dict().items())


def test_reason_first_counts_the_teachers_explanation_tokens_and_trains(fresh_tiny, tmp_path):
    plain = make_module(fresh_tiny, FixedTeacher())
    fit(plain, steps=1, tmp_path=tmp_path)
    context = ReasonFirstContext(rationale_sampling={"temperature": 0.0, "max_new_tokens": 5})
    module = make_module(fresh_tiny, FixedTeacher(), teacher_context=context)
    seen: list[list[str]] = []
    original = context.rationales
    context.rationales = lambda batch, tools: seen.append(original(batch, tools)) or seen[-1]
    trainer = fit(module, steps=1, tmp_path=tmp_path)
    assert len(seen) == 1 and len(seen[0]) == 2  # one explanation per problem of the batch
    # The same rollouts as without reason-first, plus up to 5 explanation tokens per problem.
    assert plain.generated_tokens < module.generated_tokens <= plain.generated_tokens + 2 * 5
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def _one_step_gradients(loaded, **kwargs) -> dict[str, torch.Tensor]:
    """Gradients of one OPSD micro-batch loss (the same rollouts: seeded by step and micro-batch)."""
    module = make_module(loaded, FixedTeacher(), **kwargs)
    data = ArithDataModule(train_size=16, val_size=4, batch_size=4, seed=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.count_generated = lambda rollout: rollout.num_tokens  # no trainer attached
    module.manual_backward = lambda loss: loss.backward()
    loaded.model.zero_grad(set_to_none=True)
    result = module.micro_batch_loss(batch, 0)
    if not result.backward_done:
        result.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in loaded.model.named_parameters() if p.grad is not None}
    grads["loss_sum"], grads["tokens"] = result.loss_sum.detach(), result.num_tokens.float()
    return grads


def test_chunked_loss_and_micro_batches_give_the_full_logits_whole_batch_gradients(fresh_tiny):
    full = _one_step_gradients(fresh_tiny, loss={"backend": "full_logits"})
    chunked = _one_step_gradients(fresh_tiny, loss={"backend": "chunked", "chunk_size": 7})
    sliced = _one_step_gradients(fresh_tiny, loss={"backend": "chunked", "chunk_size": 5}, micro_batch_size=3)
    assert full["tokens"] > 0 and len(full) > 10
    for other in (chunked, sliced):
        assert other.keys() == full.keys()
        # fp32 summation order differs; the KL of two close distributions cancels to ~1e-4 per token,
        # so its absolute error (~1e-7 per token) is what the tolerance allows.
        torch.testing.assert_close(other.pop("loss_sum"), full["loss_sum"], rtol=1e-3, atol=1e-5)
        for name, value in other.items():
            torch.testing.assert_close(value, full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_scores_with_the_ema_teachers_own_head(fresh_tiny):
    """The EMA teacher swaps its weights in only while it scores; the chunked loss must still use its head."""
    module = make_module(fresh_tiny, EMATeacher(decay=0.5))
    with torch.no_grad():  # an EMA that has moved away from the live weights, head (tied embedding) included
        for shadow in module.teacher.shadow.values():
            shadow.add_(0.05 * torch.randn_like(shadow))
    data = ArithDataModule(train_size=16, val_size=4, batch_size=4, seed=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    prompt = module.contexts.student_batch(batch["problem"])
    rollout = sample(module, prompt)
    teacher_prompt = module.contexts.teacher_batch(batch["problem"], batch["solution"])
    args = (prompt, teacher_prompt, rollout.completion_ids, rollout.completion_mask, rollout.completion_mask)
    sums = {}
    for backend in ("full_logits", "chunked"):
        module.terms[0].loss = LossSettings(backend=backend)
        sums[backend] = distill_sum(module, *args).loss_sum.detach()
    torch.testing.assert_close(sums["chunked"], sums["full_logits"], rtol=1e-4, atol=1e-5)


def test_one_generate_per_step_trains_as_the_accumulated_micro_batches_it_replaces(tmp_path):
    """The recipes generate a step's prompts in one call (batch 4, trained 2 rows at a time) instead of one
    call per accumulated micro-batch (batch 2 x 2 steps): the weights do not change inside a step, so greedy
    rollouts, the token-mean loss and the update are the same, with half the engine calls."""
    from tests.conftest import build_small_tiny

    greedy = {"temperature": 0.0, "max_new_tokens": 6}
    setups = {"accumulated": (2, {"accumulate_grad_batches": 2}), "batched": (4, {"micro_batch_size": 2})}
    results = {}
    for name, (batch_size, options) in setups.items():
        loaded = build_small_tiny()
        # SGD: the update is linear in the gradient, whose fp32 sums the two setups order differently.
        module = opsd_module(loaded, sampling=greedy, gradient_clip_val=None, **options)
        calls: list[int] = []

        def counted(*args, calls=calls, generate=module.engine.generate, **kwargs):
            calls.append(1)
            return generate(*args, **kwargs)

        module.engine.generate = counted
        trainer = fit(module, steps=1, tmp_path=tmp_path / name, batch_size=batch_size)
        weights = {key: value.clone() for key, value in loaded.model.state_dict().items()}
        results[name] = (
            len(calls),
            float(trainer.callback_metrics["train/loss"]),
            module.generated_tokens,
            weights,
        )
    (calls_a, loss_a, tokens_a, weights_a), (calls_b, loss_b, tokens_b, weights_b) = results.values()
    assert (calls_a, calls_b) == (2, 1) and tokens_a == tokens_b > 0
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for key, value in weights_a.items():
        torch.testing.assert_close(weights_b[key], value, rtol=1e-5, atol=1e-6, msg=key)
