"""Pin the per-token divergences against closed forms computed independently in float64."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import hydra.utils
import numpy as np
import pytest
import torch

from opsd_lightning.objectives import (
    Divergence,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SampledToken,
    TopK,
    masked_token_sum,
)

N, V = 5, 7
DIVERGENCE_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "divergence"


def _logits(seed: int, n: int = N, v: int = V, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=generator) * scale


def _ref_softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    z = row.astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def _ref_kl_terms(p: np.ndarray, q: np.ndarray) -> list[float]:
    return [pi * math.log(pi / qi) if pi > 0 else 0.0 for pi, qi in zip(p, q, strict=True)]


def _ref_terms(name: str, p_teacher: np.ndarray, p_student: np.ndarray, beta: float) -> list[float]:
    if name == "forward":
        return _ref_kl_terms(p_teacher, p_student)
    if name == "reverse":
        return _ref_kl_terms(p_student, p_teacher)
    mixture = beta * p_teacher + (1 - beta) * p_student
    teacher_terms = _ref_kl_terms(p_teacher, mixture)
    student_terms = _ref_kl_terms(p_student, mixture)
    return [beta * a + (1 - beta) * b for a, b in zip(teacher_terms, student_terms, strict=True)]


def _reference(
    name: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
    clip: float | None = None,
) -> np.ndarray:
    """Per-row divergence with plain Python loops over float64 probabilities."""
    values = []
    for s_row, t_row in zip(student.double().numpy(), teacher.double().numpy(), strict=True):
        terms = _ref_terms(name, _ref_softmax(t_row, temperature), _ref_softmax(s_row, temperature), beta)
        values.append(sum(min(term, clip) if clip is not None else term for term in terms))
    return np.array(values)


def _cases() -> list[tuple[str, Divergence, str, float]]:
    """(id, divergence at temperature 1, reference name, beta) for the vocabulary-wide divergences."""
    cases = [("forward_kl", ForwardKL(), "forward", 0.0), ("reverse_kl", ReverseKL(), "reverse", 0.0)]
    cases += [(f"jsd_{beta}", GeneralizedJSD(beta=beta), "jsd", beta) for beta in (0.1, 0.5, 0.9)]
    return cases


def _build(divergence: Divergence, **overrides: float | None) -> Divergence:
    kwargs = {"temperature": divergence.temperature, "clip": divergence.clip, **overrides}
    if isinstance(divergence, GeneralizedJSD):
        return GeneralizedJSD(beta=divergence.beta, **kwargs)
    return type(divergence)(**kwargs)


CASES = _cases()
CASE_IDS = [case[0] for case in CASES]
TOKEN_IDS = torch.arange(N) % V


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("case_id", "divergence", "name", "beta"), CASES, ids=CASE_IDS)
def test_matches_closed_form(case_id, divergence, name, beta, temperature):
    student, teacher = _logits(0), _logits(1)
    divergence = _build(divergence, temperature=temperature)
    got = divergence.per_token(student, teacher, TOKEN_IDS)
    assert got.shape == (N,) and got.dtype == torch.float32
    expected = _reference(name, student, teacher, temperature=temperature, beta=beta)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    student, teacher = _logits(2), _logits(3)
    jsd0 = GeneralizedJSD(beta=0.0).per_token(student, teacher, TOKEN_IDS)
    jsd1 = GeneralizedJSD(beta=1.0).per_token(student, teacher, TOKEN_IDS)
    torch.testing.assert_close(jsd0, ForwardKL().per_token(student, teacher, TOKEN_IDS))
    torch.testing.assert_close(jsd1, ReverseKL().per_token(student, teacher, TOKEN_IDS))
    assert (jsd0 - jsd1).abs().max() > 1e-3  # the endpoints really differ on these logits


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_swapping_teacher_and_student_mirrors_beta(beta):
    student, teacher = _logits(4), _logits(5)
    swapped = GeneralizedJSD(beta=beta).per_token(teacher, student, TOKEN_IDS)
    mirrored = GeneralizedJSD(beta=1.0 - beta).per_token(student, teacher, TOKEN_IDS)
    torch.testing.assert_close(swapped, mirrored)


@pytest.mark.parametrize(("case_id", "divergence", "name", "beta"), CASES, ids=CASE_IDS)
def test_zero_for_identical_and_nonnegative_otherwise(case_id, divergence, name, beta):
    logits = _logits(6)
    assert divergence.per_token(logits, logits.clone(), TOKEN_IDS).abs().max() < 1e-6
    random_values = divergence.per_token(
        _logits(7, n=64), _logits(8, n=64), torch.zeros(64, dtype=torch.long)
    )
    assert (random_values >= -1e-6).all()


@pytest.mark.parametrize(("case_id", "divergence", "name", "beta"), CASES, ids=CASE_IDS)
def test_topk_with_full_vocabulary_equals_base(case_id, divergence, name, beta):
    student, teacher = _logits(9), _logits(10)
    for k in (V, V + 3):
        torch.testing.assert_close(
            TopK(divergence, k=k).per_token(student, teacher, TOKEN_IDS),
            divergence.per_token(student, teacher, TOKEN_IDS),
        )


def test_topk_two_matches_hand_computation():
    # Teacher's top-2 are indices 0 and 3: teacher logits (3, 2), student logits (0, 1) there.
    # Renormalised: pT = (σ(1), σ(−1)), pS = (σ(−1), σ(1)); log ratio ±1, so FKL = σ(1) − σ(−1) = tanh(1/2).
    teacher = torch.tensor([[3.0, 1.0, 0.0, 2.0]])
    student = torch.tensor([[0.0, 2.0, 1.0, 1.0]])
    token_ids = torch.tensor([1])
    got = TopK(ForwardKL(), k=2).per_token(student, teacher, token_ids)
    torch.testing.assert_close(got, torch.tensor([math.tanh(0.5)]))
    # By symmetry of this example the reverse KL is the same number.
    torch.testing.assert_close(TopK(ReverseKL(), k=2).per_token(student, teacher, token_ids), got)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(("case_id", "divergence", "name", "beta"), CASES, ids=CASE_IDS)
def test_topk_equals_base_on_teacher_top_entries(case_id, divergence, name, beta, k):
    student, teacher = _logits(11), _logits(12)
    divergence = _build(divergence, temperature=1.5)
    wrapped = TopK(divergence, k=k)
    assert wrapped.temperature == 1.5 and wrapped.clip is None and wrapped.needs_full_teacher_logits
    top = teacher.topk(k, dim=-1).indices
    expected = _reference(name, student.gather(-1, top), teacher.gather(-1, top), temperature=1.5, beta=beta)
    got = wrapped.per_token(student, teacher, TOKEN_IDS)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    if k == 1:
        assert got.abs().max() < 1e-6  # one renormalised entry: both distributions are a point mass


@pytest.mark.parametrize("clip", [None, 0.5])
def test_sampled_token_value_and_gradient(clip):
    temperature = 1.5
    teacher = _logits(13)
    token_ids = torch.tensor([0, 3, 6, 2, 2])
    student = _logits(14).requires_grad_()
    got = SampledToken(temperature=temperature, clip=clip).per_token(student, teacher, token_ids)

    reference_student = student.detach().clone().requires_grad_()
    s = torch.log_softmax(reference_student.double() / temperature, -1).gather(-1, token_ids[:, None])[:, 0]
    t = torch.log_softmax(teacher.double() / temperature, -1).gather(-1, token_ids[:, None])[:, 0]
    advantage = (t - s).detach()
    if clip is not None:
        advantage = advantage.clamp(-clip, clip)
        assert (advantage.abs() == clip).any()  # the clip is active on these logits
    torch.testing.assert_close(got, (-advantage).float())
    if clip is None:
        torch.testing.assert_close(got, (s - t).float().detach())

    got.sum().backward()
    (-advantage * s).sum().backward()
    torch.testing.assert_close(student.grad, reference_student.grad)
    assert not SampledToken.needs_full_teacher_logits


@pytest.mark.parametrize(
    "divergence",
    [
        ForwardKL(temperature=1.3),
        ReverseKL(temperature=0.7),
        GeneralizedJSD(beta=0.3),
        TopK(ReverseKL(), k=4),
    ],
    ids=["forward_kl", "reverse_kl", "jsd", "topk"],
)
def test_gradient_matches_gradcheck_and_skips_teacher(divergence):
    student = _logits(15).double().requires_grad_()
    teacher = _logits(16).double()
    assert torch.autograd.gradcheck(lambda x: divergence.per_token(x, teacher, TOKEN_IDS), (student,))

    teacher_with_grad = _logits(16).requires_grad_()
    divergence.per_token(_logits(15).requires_grad_(), teacher_with_grad, TOKEN_IDS).sum().backward()
    assert teacher_with_grad.grad is None


def test_sampled_token_leaves_teacher_without_gradient():
    teacher = _logits(17).requires_grad_()
    SampledToken().per_token(_logits(18).requires_grad_(), teacher, TOKEN_IDS).sum().backward()
    assert teacher.grad is None


@pytest.mark.parametrize(("case_id", "divergence", "name", "beta"), CASES, ids=CASE_IDS)
def test_clip_caps_each_vocabulary_entry(case_id, divergence, name, beta):
    clip = 0.02
    student, teacher = _logits(19), _logits(20)
    clipped = _build(divergence, clip=clip).per_token(student, teacher, TOKEN_IDS)
    unclipped = divergence.per_token(student, teacher, TOKEN_IDS)
    assert (clipped <= V * clip + 1e-6).all()
    assert (clipped < unclipped - 1e-4).any()  # the clip is active
    expected = _reference(name, student, teacher, beta=beta, clip=clip)
    np.testing.assert_allclose(clipped.numpy(), expected, rtol=1e-5, atol=1e-6)


ALL_DIVERGENCES = [case[1] for case in CASES] + [TopK(GeneralizedJSD(), k=3), SampledToken()]
ALL_IDS = [*CASE_IDS, "topk_jsd", "sampled_token"]


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=ALL_IDS)
def test_extreme_and_masked_logits_stay_finite(divergence):
    generator = torch.Generator().manual_seed(21)
    signs = torch.randint(0, 2, (N, V), generator=generator) * 2.0 - 1.0
    student = (signs * 1e4).requires_grad_()
    teacher = -signs * 1e4
    values = divergence.per_token(student, teacher, TOKEN_IDS)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(student.grad).all()

    # -inf at the same entries of both: those entries contribute exactly nothing.
    masked = torch.zeros(N, V, dtype=torch.bool)
    masked[:, 4:] = True
    student, teacher, token_ids = _logits(22), _logits(23), TOKEN_IDS % 4
    masked_student = student.masked_fill(masked, -math.inf).requires_grad_()
    values = divergence.per_token(masked_student, teacher.masked_fill(masked, -math.inf), token_ids)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(masked_student.grad).all()
    torch.testing.assert_close(values, divergence.per_token(student[:, :4], teacher[:, :4], token_ids))


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=ALL_IDS)
def test_bf16_teacher_gives_float32(divergence):
    student = _logits(24).requires_grad_()
    teacher = _logits(25).bfloat16()
    values = divergence.per_token(student, teacher, TOKEN_IDS)
    assert values.dtype == torch.float32
    expected = divergence.per_token(student, teacher.float(), TOKEN_IDS)
    torch.testing.assert_close(values, expected)  # the bf16 values are exact in float32


@pytest.mark.parametrize(
    ("build", "option"),
    [
        (lambda: ForwardKL(temperature=0.0), "temperature"),
        (lambda: ReverseKL(temperature=-1.0), "temperature"),
        (lambda: SampledToken(temperature=float("nan")), "temperature"),
        (lambda: ForwardKL(clip=0.0), "clip"),
        (lambda: SampledToken(clip=-0.1), "clip"),
        (lambda: GeneralizedJSD(beta=-0.1), "beta"),
        (lambda: GeneralizedJSD(beta=1.5), "beta"),
        (lambda: GeneralizedJSD(clip=-1.0), "clip"),
        (lambda: TopK(ForwardKL(), k=0), "k"),
        (lambda: TopK(SampledToken(), k=5), "SampledToken"),
    ],
)
def test_invalid_arguments_name_the_option(build, option):
    with pytest.raises(ValueError, match=option):
        build()


def test_jsd_beta_error_gives_the_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        GeneralizedJSD(beta=2.0)


def test_masked_token_sum():
    per_token = torch.tensor([[1.0, 2.0, math.inf], [4.0, math.nan, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    total, count = masked_token_sum(per_token, mask)
    assert total.dtype == torch.float32 and total.item() == 13.0
    assert count.dtype == torch.long and count.item() == 4
    total, count = masked_token_sum(per_token, torch.zeros_like(mask))
    assert total.item() == 0.0 and count.item() == 0


def test_every_divergence_config_instantiates():
    """Each option as Hydra composes it (an option may extend another, e.g. topk_tail extends topk)."""
    paths = sorted(DIVERGENCE_CONF_DIR.glob("*.yaml"))
    assert paths, f"no configs in {DIVERGENCE_CONF_DIR}"
    vocabulary = 32  # more than the configs' top-k (20), so that a tail bucket has entries
    with hydra.initialize_config_dir(str(DIVERGENCE_CONF_DIR), version_base=None):
        for path in paths:
            divergence = hydra.utils.instantiate(hydra.compose(path.stem))
            assert isinstance(divergence, Divergence), path.name
            divergence.check_vocabulary(vocabulary)
            values = divergence.per_token(_logits(26, v=vocabulary), _logits(27, v=vocabulary), TOKEN_IDS)
            assert values.shape == (N,) and torch.isfinite(values).all(), path.name
