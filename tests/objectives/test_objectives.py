"""The objective family: top-k with a tail bucket, clip modes, token weights, diagnostics, and the chunked
objective against the full-logits one (values, gradients, diagnostics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opsd_lightning.objectives import (
    DIAGNOSTIC_KEYS,
    EntropyGate,
    ForwardKL,
    GeneralizedJSD,
    NoWeighting,
    PositionWeighting,
    ReverseKL,
    SampledToken,
    TokenDiagnostics,
    TokenFeatures,
    TopK,
    chunked_objective_sum,
    objective_sum,
)
from opsd_lightning.objectives.chunked import full_logits
from opsd_lightning.objectives.diagnostics import distribution_stats, entropy, token_diagnostics
from opsd_lightning.objectives.settings import LossSettings
from opsd_lightning.objectives.terms import completion_features
from tests.conftest import build_small_tiny, opsd_module, quiet_trainer

F64 = torch.float64


def _features(lengths: list[int]) -> TokenFeatures:
    """Features of completions of these lengths, their tokens concatenated."""
    position = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(0, dtype=torch.long)])
    length = torch.cat([torch.full((n,), n) for n in lengths] + [torch.zeros(0, dtype=torch.long)])
    return TokenFeatures(position=position, length=length)


def _logits(n: int, v: int, seed: int = 0, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(n, v, generator=generator, dtype=dtype)
    teacher = student + 1.5 * torch.randn(n, v, generator=generator, dtype=dtype)
    return student.requires_grad_(), teacher


def _log_softmax_np(x: np.ndarray, temperature: float) -> np.ndarray:
    z = x / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# --- top-k with a tail bucket -------------------------------------------------------------------------


def test_tail_buckets_hold_the_rest_of_the_mass_of_both_distributions():
    student, teacher = _logits(6, 30)
    topk = TopK(ForwardKL(temperature=0.7), k=5, tail=True)
    student_logp, teacher_logp = topk.tail_log_probs(student, teacher)
    assert student_logp.shape == teacher_logp.shape == (6, 6)
    for logp in (student_logp, teacher_logp):
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(6, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("base", [ForwardKL(temperature=0.7), ReverseKL(temperature=1.3)], ids=["fkl", "rkl"])
def test_tail_value_matches_a_brute_force_formula(base):
    student, teacher = _logits(4, 12, seed=1)
    k, temperature = 3, base.temperature
    got = TopK(base, k=k, tail=True).per_token(student, teacher, torch.zeros(4, dtype=torch.long))
    s, t = (_log_softmax_np(x.detach().numpy(), temperature) for x in (student, teacher))
    expected = []
    for row in range(4):
        top = np.argsort(-teacher[row].numpy())[:k]
        rest = np.setdiff1d(np.arange(12), top)
        # Not renormalised: the top-k probabilities as they are, plus 1 − their sum.
        p_s = np.append(np.exp(s[row, top]), np.exp(s[row, rest]).sum())
        p_t = np.append(np.exp(t[row, top]), np.exp(t[row, rest]).sum())
        p, q = (p_t, p_s) if isinstance(base, ForwardKL) else (p_s, p_t)
        expected.append(float((p * np.log(p / q)).sum()))
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-12, atol=1e-14)


def test_tail_gradient_passes_gradcheck():
    student, teacher = _logits(3, 9, seed=2)
    topk = TopK(GeneralizedJSD(beta=0.3, temperature=0.8), k=4, tail=True)
    ids = torch.zeros(3, dtype=torch.long)
    assert torch.autograd.gradcheck(lambda s: topk.per_token(s, teacher, ids), (student,))


def test_tail_needs_tail_entries_and_a_vocabulary_base():
    with pytest.raises(ValueError, match=r"divergence\.k=8 with divergence\.tail=true"):
        TopK(ForwardKL(), k=8, tail=True).check_vocabulary(8)
    TopK(ForwardKL(), k=8).check_vocabulary(8)  # without the tail, k = V is the full vocabulary
    with pytest.raises(ValueError, match=r"divergence\.k=8"):
        TopK(ForwardKL(), k=8, tail=True).per_token(*_logits(2, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="tail=true needs a base"):
        TopK(TopK(ForwardKL(), k=3), k=2, tail=True)


# --- clip modes ---------------------------------------------------------------------------------------

# Teacher (0.9, 0.1), student (0.5, 0.5): forward-KL terms 0.9·ln 1.8 ≈ 0.529 and 0.1·ln 0.2 ≈ −0.161.
HAND_TEACHER = torch.tensor([[math.log(0.9), math.log(0.1)]], dtype=F64)
HAND_STUDENT = torch.tensor([[math.log(0.5), math.log(0.5)]], dtype=F64)
BIG, SMALL = 0.9 * math.log(1.8), 0.1 * math.log(0.2)


@pytest.mark.parametrize(
    ("clip", "mode", "value", "clipped"),
    [
        (None, "entry", BIG + SMALL, False),
        (0.3, "entry", 0.3 + SMALL, True),  # each entry capped: below the cap, and below 0.3
        (0.3, "token", 0.3, True),
        (0.4, "entry", 0.4 + SMALL, True),  # the big entry is over 0.4, the sum (0.368) is not
        (0.4, "token", BIG + SMALL, False),
    ],
)
def test_entry_and_token_clip_on_a_hand_built_example(clip, mode, value, clipped):
    divergence = ForwardKL(clip=clip, clip_mode=mode)
    ids = torch.zeros(1, dtype=torch.long)
    got = divergence.per_token(HAND_STUDENT, HAND_TEACHER, ids)
    torch.testing.assert_close(got, torch.tensor([value], dtype=F64), rtol=1e-12, atol=1e-12)
    assert divergence.clipped(HAND_STUDENT, HAND_TEACHER, ids).tolist() == [clipped]
    # The same through TopK's base (k = V: the full vocabulary).
    assert TopK(divergence, k=2).clipped(HAND_STUDENT, HAND_TEACHER, ids).tolist() == [clipped]


def test_clip_fraction_on_a_hand_built_example():
    # Three tokens: the hand example (sum 0.368), identical distributions (0), the example again.
    student = torch.cat([HAND_STUDENT, HAND_TEACHER, HAND_STUDENT])
    teacher = torch.cat([HAND_TEACHER, HAND_TEACHER, HAND_TEACHER])
    ids, features = torch.zeros(3, dtype=torch.long), _features([3])
    for mode, fraction in [("entry", 2 / 3), ("token", 0.0)]:
        divergence = ForwardKL(clip=0.4, clip_mode=mode)
        result = objective_sum(student, teacher, ids, divergence, features=features, diagnostics=True)
        assert result.diagnostics.means()["diag/clip_fraction"] == pytest.approx(fraction)
    advantage_clip = SampledToken(clip=0.5)  # |log pT(ŷ) − log pS(ŷ)| = |ln 1.8| > 0.5, then 0, then ln 0.2
    assert advantage_clip.clipped(student, teacher, ids).tolist() == [True, False, True]
    assert not ForwardKL().clipped(student, teacher, ids).any()


def test_clip_mode_must_be_entry_or_token():
    with pytest.raises(ValueError, match=r"divergence\.clip_mode='sum'"):
        ReverseKL(clip=1.0, clip_mode="sum")
    with pytest.raises(ValueError, match=r"divergence\.clip_mode"):
        GeneralizedJSD(clip_mode="tokens")


# --- token weights ------------------------------------------------------------------------------------


def test_position_weights_for_lengths_1_2_and_4():
    weights = PositionWeighting(slope=1.0).divergence_weights(_features([1, 2, 4]))
    expected = [1.0, 2 / 3, 4 / 3, 2 / 3, 8 / 9, 10 / 9, 4 / 3]
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    steep = PositionWeighting(slope=7.5).divergence_weights(_features([5, 9, 2]))
    for chunk in steep.split([5, 9, 2]):
        assert chunk.mean().item() == pytest.approx(1.0, abs=1e-6)
        assert (chunk.diff() > 0).all()
    assert torch.equal(PositionWeighting(slope=0.0).divergence_weights(_features([3])), torch.ones(3))


def test_entropy_gate_opens_above_the_threshold():
    # Two equal logits (entropy ln 2 ≈ 0.69) and four (ln 4 ≈ 1.39); the threshold sits between them.
    teacher = torch.tensor([[0.0, 0.0, -math.inf, -math.inf], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    teacher_entropy = entropy(teacher, temperature=1.0)
    torch.testing.assert_close(teacher_entropy, torch.tensor([math.log(2), math.log(4)], dtype=F64))
    features = _features([2]).with_teacher_entropy(teacher_entropy)
    gate = EntropyGate(threshold=1.0, coef=0.5)
    assert torch.equal(gate.divergence_weights(features), torch.ones(2))
    assert gate.forward_kl_weights(features).tolist() == [0.0, 0.5]
    at_threshold = EntropyGate(threshold=math.log(4) + 1e-9, coef=0.5).forward_kl_weights(features)
    assert at_threshold.tolist() == [0.0, 0.0]
    assert EntropyGate(coef=0.0).forward_kl_weights(features) is None
    # The objective: reverse KL everywhere plus 0.5 · KL(T‖S) on the second token only.
    student = torch.tensor([[1.0, 0.0, 0.5, -1.0], [0.3, -0.2, 0.1, 2.0]], dtype=F64)
    ids = torch.zeros(2, dtype=torch.long)
    got = objective_sum(student, teacher, ids, ReverseKL(), gate, _features([2])).loss_sum
    expected = (
        ReverseKL().per_token(student, teacher, ids).sum()
        + 0.5 * ForwardKL().per_token(student[1:], teacher[1:], ids[1:]).sum()
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PositionWeighting(slope=-1.0), r"weighting\.slope=-1\.0 must be > -1"),
        (lambda: PositionWeighting(slope=-2), r"weighting\.slope=-2 must be > -1"),
        (lambda: PositionWeighting(slope=float("nan")), r"weighting\.slope"),
        (lambda: EntropyGate(threshold=-0.1), r"weighting\.threshold=-0\.1 must be >= 0"),
        (lambda: EntropyGate(coef=-1.0), r"weighting\.coef=-1\.0 must be >= 0"),
    ],
)
def test_bad_weighting_options_name_the_option(build, message):
    with pytest.raises(ValueError, match=message):
        build()


UNIT_WEIGHTINGS = {
    "none": NoWeighting(),
    "position_slope_0": PositionWeighting(slope=0.0),
    "gate_coef_0": EntropyGate(coef=0.0),
    "gate_never_open": EntropyGate(threshold=1e6, coef=1.0),
}


@pytest.mark.parametrize("name", list(UNIT_WEIGHTINGS))
def test_weights_of_one_reproduce_the_unweighted_objective_exactly(name):
    student, teacher = _logits(9, 20, seed=3, dtype=torch.float32)
    ids, features = torch.zeros(9, dtype=torch.long), _features([4, 5])
    divergence = ForwardKL(temperature=0.9)
    plain = divergence.per_token(student, teacher, ids).sum()
    weighted = objective_sum(student, teacher, ids, divergence, UNIT_WEIGHTINGS[name], features).loss_sum
    assert torch.equal(weighted, plain)
    assert torch.equal(*(torch.autograd.grad(x, student)[0] for x in (weighted, plain)))
    hidden = _hidden_inputs(13, dtype=torch.float32)[:4]
    reference = chunked_objective_sum(*hidden, divergence, chunk_size=4).loss_sum
    got = chunked_objective_sum(*hidden, divergence, UNIT_WEIGHTINGS[name], _features([6, 7]), chunk_size=4)
    assert torch.equal(got.loss_sum, reference)
    student_hidden, weight = hidden[0], hidden[2]
    params = (student_hidden, weight)
    for a, b in zip(
        torch.autograd.grad(got.loss_sum, params), torch.autograd.grad(reference, params), strict=True
    ):
        assert torch.equal(a, b)


# --- diagnostics --------------------------------------------------------------------------------------


def test_each_diagnostic_against_a_hand_computed_value():
    v = 25
    student = torch.arange(v, dtype=F64).expand(2, v)  # its top-20: ids 5..24, argmax 24
    probs = torch.tensor([0.06] * 5 + [0.035] * 20, dtype=F64)  # 0.3 on ids 0..4, argmax 0
    teacher = torch.stack([probs.log(), student[1]])  # the second token: the student's own distribution
    stats = distribution_stats(student, teacher, temperature=1.0)
    teacher_entropy = -(5 * 0.06 * math.log(0.06) + 20 * 0.035 * math.log(0.035))
    student_p = torch.softmax(student[0], -1)
    student_entropy = float(-(student_p * student_p.log()).sum())
    student_top20_mass = float(student_p[5:].sum())
    torch.testing.assert_close(
        stats.teacher_entropy, torch.tensor([teacher_entropy, student_entropy], dtype=F64)
    )
    torch.testing.assert_close(stats.student_entropy, torch.tensor([student_entropy] * 2, dtype=F64))
    assert stats.top1_agreement.tolist() == [False, True]
    torch.testing.assert_close(
        stats.teacher_mass_on_student_topk, torch.tensor([0.7, student_top20_mass], dtype=F64)
    )
    # With V ≤ 20 the student's top-k is the whole vocabulary: all the teacher's mass.
    small = distribution_stats(student[:, :4], teacher[:, :4], temperature=1.0)
    torch.testing.assert_close(small.teacher_mass_on_student_topk, torch.ones(2, dtype=F64))


def test_diagnostic_sums_add_and_average_by_position_quarter():
    stats = distribution_stats(*_logits(5, 6), temperature=1.0)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)  # one completion of 5: u = 0, .25, .5, .75, 1
    clipped = torch.tensor([True, False, False, False, True])
    one = token_diagnostics(stats, values, clipped, _features([5]))
    means = one.means()
    assert set(means) == set(DIAGNOSTIC_KEYS)
    assert [means[f"diag/divergence_q{q}"] for q in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 4.5]
    assert means["diag/clip_fraction"] == pytest.approx(0.4)
    assert means["diag/teacher_entropy"] == pytest.approx(float(stats.teacher_entropy.mean()))
    # A completion of 2 (u = 0, 1) adds to q1 and q4 only; q2, q3 stay as they were.
    two = token_diagnostics(
        distribution_stats(*_logits(2, 6, seed=4), 1.0), values[:2] * 10, clipped[:2], _features([2])
    )
    both = (one + two).means()
    assert [both[f"diag/divergence_q{q}"] for q in (1, 2, 3, 4)] == [(1 + 10) / 2, 2.0, 3.0, (4 + 5 + 20) / 3]
    assert both["diag/clip_fraction"] == pytest.approx(3 / 7)
    short = two.means()  # an empty quarter is left out, not logged as 0
    assert "diag/divergence_q2" not in short and "diag/divergence_q3" not in short
    assert TokenDiagnostics.empty().means() == {}


def test_completion_features_of_a_padded_batch():
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    loss_mask = completion_mask.clone()
    loss_mask[2] = False  # e.g. a truncated row, masked out
    features = completion_features(completion_mask, loss_mask)
    assert features.position.tolist() == [0, 1, 2, 0]
    assert features.length.tolist() == [3, 3, 3, 1]


# --- the chunked objective against the full-logits one ------------------------------------------------

H, V = 6, 30


def _hidden_inputs(n, dtype=F64, teacher_h=H, seed=0):
    """(student_hidden, teacher_hidden, weight, token_ids, teacher_weight); the student's require grad."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(n, H, generator=generator, dtype=dtype)
    weight = 0.7 * torch.randn(V, H, generator=generator, dtype=dtype)
    teacher = torch.randn(n, teacher_h, generator=generator, dtype=dtype)
    teacher_weight = 0.7 * torch.randn(V, teacher_h, generator=generator, dtype=dtype)
    token_ids = torch.randint(0, V, (n,), generator=generator)
    if teacher_h == H:  # a self-distillation teacher: close to the student, through the same head
        teacher, teacher_weight = student + 0.5 * teacher, None
    return student.requires_grad_(), teacher, weight.requires_grad_(), token_ids, teacher_weight


def _gate_threshold(inputs) -> float:
    """A threshold between the teacher's entropies, so that the gate is open on about half the tokens."""
    _, teacher_logits = full_logits(inputs[0], inputs[1], inputs[2], teacher_weight=inputs[4])
    return float(entropy(teacher_logits, 1.0).median())


CASES = {
    "fkl_position": (lambda: ForwardKL(temperature=0.8), lambda t: PositionWeighting(slope=2.0)),
    "jsd_position": (lambda: GeneralizedJSD(beta=0.3), lambda t: PositionWeighting(slope=-0.5)),
    "rkl_entropy_gate": (lambda: ReverseKL(), lambda t: EntropyGate(threshold=t, coef=0.7)),
    "topk_sparse_position": (lambda: TopK(ReverseKL(temperature=1.2), k=4), lambda t: PositionWeighting()),
    "topk_gate": (lambda: TopK(ForwardKL(), k=4), lambda t: EntropyGate(threshold=t, coef=2.0)),
    "topk_tail": (lambda: TopK(ForwardKL(temperature=0.9), k=5, tail=True), lambda t: None),
    "topk_tail_token_clip": (
        lambda: TopK(ReverseKL(clip=0.05, clip_mode="token"), k=5, tail=True),
        lambda t: None,
    ),
    "fkl_token_clip_position": (
        lambda: ForwardKL(clip=0.1, clip_mode="token"),
        lambda t: PositionWeighting(),
    ),
    "sampled_token_position": (lambda: SampledToken(clip=0.5), lambda t: PositionWeighting()),
}
LENGTHS = [5, 1, 7]  # 13 tokens; chunk 4 divides neither


@pytest.mark.parametrize("recompute", [False, True], ids=["grad_in_forward", "recompute"])
@pytest.mark.parametrize("name", list(CASES))
def test_chunked_objective_matches_the_full_logits_objective(name, recompute):
    inputs = _hidden_inputs(13)
    student, teacher, weight, token_ids, _ = inputs
    build_divergence, build_weighting = CASES[name]
    divergence, weighting = build_divergence(), build_weighting(_gate_threshold(inputs))
    options = {"weighting": weighting, "features": _features(LENGTHS), "diagnostics": True}
    reference = objective_sum(*full_logits(student, teacher, weight), token_ids, divergence, **options)
    chunked = chunked_objective_sum(
        student, teacher, weight, token_ids, divergence, chunk_size=4, recompute=recompute, **options
    )
    torch.testing.assert_close(chunked.loss_sum, reference.loss_sum, rtol=1e-10, atol=1e-12)
    params = (student, weight)
    grads = (torch.autograd.grad(x.loss_sum, params) for x in (chunked, reference))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    got_means, want_means = chunked.diagnostics.means(), reference.diagnostics.means()
    assert got_means.keys() == want_means.keys() == set(DIAGNOSTIC_KEYS)
    for key, value in want_means.items():
        assert got_means[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_the_weighted_cases_weigh_something():
    """Each weighting (and clip) above acts on these inputs, or its comparison would pin nothing."""
    inputs = _hidden_inputs(13)
    features = _features(LENGTHS)
    for name in ("fkl_position", "rkl_entropy_gate", "topk_gate"):
        build_divergence, build_weighting = CASES[name]
        args = (*inputs[:4], build_divergence())
        with torch.no_grad():
            weighted = chunked_objective_sum(
                *args, build_weighting(_gate_threshold(inputs)), features
            ).loss_sum
            plain = chunked_objective_sum(*args).loss_sum
        assert not torch.isclose(weighted, plain), name
    for name in ("topk_tail_token_clip", "fkl_token_clip_position", "sampled_token_position"):
        divergence = CASES[name][0]()
        result = chunked_objective_sum(*inputs[:4], divergence, features=features, diagnostics=True)
        assert 0.0 < result.diagnostics.means()["diag/clip_fraction"] < 1.0, name


def test_chunked_weighted_objective_passes_gradcheck():
    student, teacher, weight, token_ids, _ = _hidden_inputs(7)
    features = _features([3, 4])
    weighting = EntropyGate(threshold=_gate_threshold(_hidden_inputs(7)), coef=0.5)

    def loss(hidden):
        return chunked_objective_sum(
            hidden, teacher, weight.detach(), token_ids, ReverseKL(), weighting, features, chunk_size=3
        ).loss_sum

    assert torch.autograd.gradcheck(loss, (student,), fast_mode=True)
    position = PositionWeighting(slope=3.0)
    assert torch.autograd.gradcheck(
        lambda hidden: (
            chunked_objective_sum(
                hidden,
                teacher,
                weight.detach(),
                token_ids,
                GeneralizedJSD(beta=0.6),
                position,
                features,
                chunk_size=2,
            ).loss_sum
        ),
        (student,),
        fast_mode=True,
    )


def test_a_teacher_of_another_hidden_size_scores_through_its_own_head():
    student, teacher, weight, token_ids, teacher_weight = _hidden_inputs(9, teacher_h=11)
    divergence = ForwardKL()
    chunked = chunked_objective_sum(
        student, teacher, weight, token_ids, divergence, chunk_size=4, teacher_weight=teacher_weight
    ).loss_sum
    reference = divergence.per_token(
        *full_logits(student, teacher, weight, teacher_weight=teacher_weight), token_ids
    ).sum()
    torch.testing.assert_close(chunked, reference, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="teacher_weight"):
        chunked_objective_sum(
            student, teacher, weight, token_ids, divergence
        )  # no head of the teacher's size


def test_no_tokens_give_zero_and_empty_diagnostics():
    student, teacher, weight, token_ids, _ = _hidden_inputs(0)
    result = chunked_objective_sum(
        student, teacher, weight, token_ids, ForwardKL(), PositionWeighting(), _features([]), diagnostics=True
    )
    assert result.loss_sum.item() == 0.0 and result.diagnostics.means() == {}


# --- one OPSD step, both backends ---------------------------------------------------------------------


def test_an_opsd_step_with_position_weights_logs_the_diagnostics_through_both_backends(tmp_path):
    from opsd_lightning.data import ArithDataModule

    metrics = {}
    for backend in ("full_logits", "chunked"):
        module = opsd_module(build_small_tiny(), weighting=PositionWeighting(), loss=LossSettings(backend, 5))
        trainer = quiet_trainer(tmp_path / backend, max_steps=1)
        trainer.fit(module, datamodule=ArithDataModule(train_size=8, val_size=4, batch_size=2, seed=0))
        metrics[backend] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    full, chunked = metrics["full_logits"], metrics["chunked"]
    logged = {key for key in full if key.startswith("train/diag/")}
    assert {"train/diag/teacher_entropy", "train/diag/clip_fraction", "train/diag/divergence_q1"} <= logged
    assert full["train/diag/clip_fraction"] == 0.0  # forward KL without a clip
    assert 0.0 <= full["train/diag/top1_agreement"] <= 1.0
    for key in (*logged, "train/loss"):
        assert chunked[key] == pytest.approx(full[key], rel=1e-4, abs=1e-5), key
