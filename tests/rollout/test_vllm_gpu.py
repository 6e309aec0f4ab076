"""`rollout=vllm` as a GPU user first runs it: a bf16 engine with CUDA graphs, started from fp32 master
weights under `bf16-mixed`. Skipped without a CUDA device (none was lent when this was written:
docs/rollouts.md)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from opsd_lightning.contexts.batches import left_pad
from opsd_lightning.models import build_tiny, eos_token_ids
from opsd_lightning.rollout import SamplingConfig, VLLMEngine
from tests.conftest import VLLM_TINY_SHAPE

if importlib.util.find_spec("vllm") is None:
    pytest.skip('vLLM is not installed (pip install -e ".[vllm]")', allow_module_level=True)

PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [100, 7, 300, 9, 11], [3, 1, 4, 1, 5, 9, 2, 6]]
# Two bf16 forward passes (vLLM's kernels, HF's) agree to a few bf16 roundings of the logits; a first token
# whose top-2 margin exceeds this must be the same in both.
BF16_MARGIN = 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_bf16_engine_with_cuda_graphs_follows_fp32_master_weights_under_bf16_mixed():
    loaded = build_tiny(**VLLM_TINY_SHAPE, seed=0)
    model = loaded.model.to("cuda").eval()  # fp32 master weights, as bf16-mixed trains them
    eos, pad = eos_token_ids(model, loaded.tokenizer), loaded.tokenizer.pad_token_id
    engine = VLLMEngine(
        gpu_memory_utilization=0.1,
        kv_cache_memory_bytes=256 * 2**20,
        max_num_seqs=8,
        max_model_len=512,
        enforce_eager=False,  # CUDA graphs
        precision="bf16-mixed",
    )
    prompt = left_pad(PROMPTS, pad).to("cuda")
    rollout = engine.generate(model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=8), eos, pad)
    assert engine.llm.llm_engine.model_config.dtype == torch.bfloat16  # not the fp32 parameters' dtype
    assert rollout.completion_ids.shape[0] == len(PROMPTS) and rollout.num_tokens > 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # each row unpadded, as vLLM sees it
        rows = [model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1] for ids in PROMPTS]
    logits = torch.stack(rows).float()
    top2 = logits.topk(2, dim=-1)
    clear = (top2.values[:, 0] - top2.values[:, 1]) > BF16_MARGIN
    assert clear.any()
    first = rollout.completion_ids[:, 0]
    assert torch.equal(first[clear], top2.indices[clear, 0])
    # The weights change (an optimizer step): the next generation syncs them into the bf16 engine.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(-1.0)
    engine.weights_changed()
    again = engine.generate(model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=8), eos, pad)
    assert engine.last_sync_seconds is not None
    assert not torch.equal(again.completion_ids, rollout.completion_ids)
