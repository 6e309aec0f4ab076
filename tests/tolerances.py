"""Tolerances derived from the magnitudes a result sums, never from the CPU at hand.

Floating-point addition is not associative. Each SIMD kernel set (AVX-512, AVX2, plain C++), each thread
count and each chunking sums in its own order, and the results differ by up to about n·u·Σ|t_i| for n terms
t_i (u = eps/2). A result that is a small difference of large terms, such as the KL of two close
distributions, therefore carries an absolute error set by Σ|t_i|, which can be thousands of times the
result: a relative tolerance on it passes on one CPU and fails on another. The helpers here turn the
magnitudes that a comparison sums into an absolute tolerance, so a test states what it sums.
"""

from __future__ import annotations

import torch


def eps(dtype: torch.dtype) -> float:
    """The spacing of `dtype` floats at 1.0 (float32: 1.2e-7, float64: 2.2e-16)."""
    return float(torch.finfo(dtype).eps)


def summed_tolerance(magnitude: float, dtype: torch.dtype = torch.float32, steps: float = 1.0) -> float:
    """Absolute tolerance of a value computed in `dtype` as sums whose terms have |t| summing to `magnitude`,
    in any order. `steps`: roundings compounded per term (a log-softmax, a product, the sum), for chains
    longer than one; one eps of the magnitude already covers the order changes measured on every kernel set
    and thread count (they cancel far below the worst case n·u·Σ|t|)."""
    return steps * eps(dtype) * magnitude


def divergence_magnitude(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Σ over tokens and vocabulary entries of |the terms of a divergence between two `[N, V]` logit tensors|:
    each of our divergences sums p·log p and p·log q over the entries of both distributions, and the
    log-softmax behind each log-prob rounds relative to the logit and the log-sum-exp it subtracts. So the
    magnitude is Σ_v (p_t + p_s)·(|z_t| + |lse_t| + |z_s| + |lse_s|), computed in float64."""
    student, teacher = student_logits.detach().double(), teacher_logits.detach().double()
    spread = (
        student.abs()
        + torch.logsumexp(student, dim=-1, keepdim=True).abs()
        + teacher.abs()
        + torch.logsumexp(teacher, dim=-1, keepdim=True).abs()
    )
    weights = torch.softmax(student, dim=-1) + torch.softmax(teacher, dim=-1)
    return float((weights * spread).sum())
