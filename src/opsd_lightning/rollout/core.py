"""What every rollout engine shares: sampling settings, and the `Rollout` result with its EOS/truncation
semantics (a completion ends at its first EOS, inclusive; a row without one is truncated)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    """Sampling settings for `generate`; `temperature=0` means greedy decoding.

    Errors name the field alone (`top_p=0 ...`); `build_settings` adds where in the config it is.
    `cache_implementation` is passed to `generate` when set: `static` pre-allocates the KV cache and lets
    transformers compile the decode step (about 2x faster rollouts on a GPU after the first call).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    cache_implementation: str | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")

    def generate_kwargs(self) -> dict:
        cache = {"cache_implementation": self.cache_implementation} if self.cache_implementation else {}
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, **cache}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or None,
            **cache,
        }

    def sampling_log_probs(self, logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """log q(token) under the distribution these settings sample from (temperature, then top-k, then
        top-p within the top-k, as both engines apply them): `[..., V], [...] -> [...]`, fp32. Greedy has no
        distribution to score: use `temperature > 0`."""
        if self.temperature == 0:
            raise ValueError(
                "sampling_log_probs: greedy decoding (temperature=0) samples from no distribution"
            )
        flat_logits, flat_ids = logits.reshape(-1, logits.shape[-1]), token_ids.reshape(-1, 1)
        parts = [torch.zeros((0, 1), device=logits.device)]
        for chunk, ids in zip(flat_logits.split(1024), flat_ids.split(1024), strict=True):  # O(1024 x V)
            scaled = chunk.float() / self.temperature
            if len(chunk) and (self.top_k or self.top_p < 1):
                scaled = top_k_top_p_filter(scaled, self.top_k, self.top_p, in_place=True)
            parts.append(torch.log_softmax(scaled, dim=-1).gather(-1, ids))
        return torch.cat(parts).reshape(token_ids.shape)


def top_k_top_p_filter(
    logits: torch.Tensor, top_k: int | torch.Tensor, top_p: float | torch.Tensor, in_place: bool = False
) -> torch.Tensor:
    """`logits [N, V]` (temperature applied) with every token outside the sampling set at -inf: the `top_k`
    largest (0 = all), then the smallest prefix of those, by descending probability renormalised within
    them, whose mass reaches `top_p` (the top token always stays). `top_k`/`top_p` may be per-row `[N]`.

    It sorts only the top-k candidates, never the whole vocabulary (vLLM's CPU sampler sorts all of it as soon
    as top-p is set), and writes the vocabulary once. Exact ties at the top-k cut are broken by `topk`'s order
    (vLLM and HF break ties at the top-p cut by sort order). `in_place`: write into `logits` (vLLM's sampler
    allows it; it saves an allocation of [N, V]).
    """
    rows, vocab = logits.shape
    top_k = torch.as_tensor(top_k, device=logits.device).expand(rows)
    top_k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    top_p = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device).expand(rows)
    candidates, indices = logits.topk(int(top_k.max()), dim=-1)  # descending
    rank = torch.arange(candidates.shape[1], device=logits.device)
    in_top_k = rank < top_k[:, None]
    candidates = candidates.masked_fill(~in_top_k, -torch.inf)
    probs = torch.softmax(candidates.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = (mass_before < top_p[:, None]) | (rank == 0) | (top_p[:, None] >= 1)  # >= 1: fp cumsum
    kept = candidates.masked_fill(~keep, -torch.inf)
    filtered = logits.fill_(-torch.inf) if in_place else torch.full_like(logits, -torch.inf)
    return filtered.scatter_(1, indices, kept)


@dataclass
class Rollout:
    """Sampled completions, right-padded: `completion_ids [B, Lc]`, `completion_mask [B, Lc]` (True up to
    and including the first EOS), `truncated [B]` (no EOS within the budget), and `sampler_logprobs [B, Lc]`:
    log q(token) of each sampled token under the distribution that generated it (after temperature, top-k
    and top-p; 0 at padding), when the engine reports it (vLLM; None from HF, which samples with the
    trainer's own weights, and for greedy decoding)."""

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor
    seconds: float
    sampler_logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())


def completion_mask_from_ids(
    completion_ids: torch.Tensor, eos_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask every token up to and including the first EOS; a row without EOS is truncated (all kept)."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_ids), device=completion_ids.device))
    eos_seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    truncated = ~is_eos.any(dim=1)
    return ~eos_seen_before, truncated


def rollout_from_token_lists(
    completions: Sequence[Sequence[int]],
    eos_ids: Sequence[int],
    pad_id: int,
    seconds: float,
    logprobs: Sequence[Sequence[float]] | None = None,
) -> Rollout:
    """A `Rollout` from per-row completion ids (an engine that returns lists, e.g. vLLM), with the semantics
    of `generate_rollouts`: each row is cut after its first EOS, right-padded with `pad_id`, and truncated
    when it has no EOS (read from the row itself, so a pad id that is also an EOS id cannot end a row).
    `logprobs`: each token's sampler log-probability, aligned with `completions` (cut and padded with 0)."""
    eos = set(eos_ids)
    rows = []
    for ids in completions:
        ends = [index for index, token in enumerate(ids) if token in eos]
        rows.append(list(ids[: ends[0] + 1]) if ends else list(ids))
    width = max((len(ids) for ids in rows), default=0)
    completion_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, ids in enumerate(rows):
        completion_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        completion_mask[row, : len(ids)] = True
    truncated = torch.tensor([not any(token in eos for token in ids) for ids in rows], dtype=torch.bool)
    sampler_logprobs = None
    if logprobs is not None:
        sampler_logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        for row, (ids, values) in enumerate(zip(rows, logprobs, strict=True)):
            sampler_logprobs[row, : len(ids)] = torch.as_tensor(list(values[: len(ids)]), dtype=torch.float32)
    return Rollout(completion_ids, completion_mask, truncated, seconds, sampler_logprobs)
