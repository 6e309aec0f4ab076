"""How `rollout=vllm` samples: our `SamplingConfig` as vLLM `SamplingParams`, top-p applied within the top-k
by a logits processor, and the sampled tokens' log-probabilities read back.

Why the processor: vLLM's CPU sampler (`apply_top_k_top_p_pytorch`) sorts the whole vocabulary of every
row at every step as soon as top-p is set, even when top-k has already cut it to 20 candidates (top-k alone
takes a `topk`). With Qwen3's 151,936 ids that sort costs more than the model. When both are set, the
engine gets neither: `TopPWithinTopK` keeps the same tokens from the temperature-scaled logits (top-k,
then top-p renormalised within them, as vLLM and HF define it) with one `topk` per row, and vLLM samples
from what is left. The distribution is unchanged; `tests/rollout/test_sampling.py` checks it against HF's, and
`experiments/bench/vllm_sampling.py` measures the gain.

Everything here runs after `vllm.py`'s `vllm_api()` imported vLLM (with its side effects contained), so the
imports of vLLM inside the functions only look it up.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from opsd_lightning.rollout.core import SamplingConfig, top_k_top_p_filter

# The `SamplingParams.extra_args` key that hands a row's top-p to `TopPWithinTopK` instead of to vLLM.
TOP_P_WITHIN_TOP_K = "opsd_top_p_within_top_k"


def sampling_params(sampling: SamplingConfig, eos_ids: Sequence[int], seed: int | None, rows: int) -> list:
    """One `SamplingParams` per row. Stops exactly at our EOS ids, like `generate_rollouts` (vLLM's own EOS
    from the model config is ignored). Rows get different seeds derived from `seed`: a group of copies of one
    prompt (GRPO, num_samples) must not sample the same completion. A sampled row asks for its token's
    log-probability (`logprobs=0`: the sampled token's alone, after temperature/top-k/top-p)."""
    from vllm import SamplingParams

    common = {"max_tokens": sampling.max_new_tokens, "stop_token_ids": list(eos_ids), "ignore_eos": True}
    if sampling.temperature == 0:
        return [SamplingParams(temperature=0.0, **common) for _ in range(rows)]
    filters: dict[str, Any] = {"top_p": sampling.top_p, "top_k": sampling.top_k or -1}  # -1: off
    if sampling.top_k and sampling.top_p < 1:
        filters = {
            "top_p": 1.0,
            "top_k": -1,
            "extra_args": {TOP_P_WITHIN_TOP_K: [sampling.top_k, sampling.top_p]},
        }
    return [
        SamplingParams(
            temperature=sampling.temperature,
            seed=None if seed is None else row_seed(seed, row),
            logprobs=0,
            **filters,
            **common,
        )
        for row in range(rows)
    ]


def row_seed(seed: int, row: int) -> int:
    return hash((seed, row)) % (2**31)


def sampled_logprobs(completion: Any) -> list[float] | None:
    """The log-probability of each sampled token of one vLLM `CompletionOutput`, or None when none were asked
    for (greedy rows)."""
    if completion.logprobs is None:
        return None
    return [
        step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs, strict=True)
    ]


class TopPWithinTopK:
    """The state and the masking of the logits processor (vLLM's `LogitsProcessor` interface; the class
    vLLM loads is `processor_class()`). Argmax-invariant, so vLLM applies it to the temperature-scaled logits
    of sampled rows, right before its own top-k/top-p (which these rows switch off)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.filters: dict[int, list] = {}  # batch row -> [top_k, top_p]
        self.rows = self.top_k = self.top_p = torch.empty(0)

    def is_argmax_invariant(self) -> bool:
        return True  # the most likely token always stays

    def update_state(self, batch_update: Any) -> None:
        from vllm.v1.sample.logits_processor.builtin import process_dict_updates

        def filters(params: Any, _: Any, __: Any) -> list | None:
            return (params.extra_args or {}).get(TOP_P_WITHIN_TOP_K)

        if process_dict_updates(self.filters, batch_update, filters):
            rows = sorted(self.filters)
            self.rows = torch.tensor(rows, device=self.device, dtype=torch.long)
            self.top_k = torch.tensor([self.filters[row][0] for row in rows], device=self.device)
            self.top_p = torch.tensor([self.filters[row][1] for row in rows], device=self.device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.filters:
            return logits
        if len(self.filters) == logits.shape[0]:  # every row (the usual case): no gather, no scatter
            return top_k_top_p_filter(logits, self.top_k, self.top_p, in_place=True)
        logits[self.rows] = top_k_top_p_filter(logits[self.rows], self.top_k, self.top_p)
        return logits


@functools.cache
def processor_class() -> type:
    """`TopPWithinTopK` as a subclass of vLLM's `LogitsProcessor` (vLLM refuses any other class)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class TopPWithinTopKProcessor(TopPWithinTopK, LogitsProcessor):
        pass

    return TopPWithinTopKProcessor
