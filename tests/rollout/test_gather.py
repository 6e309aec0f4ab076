"""Gathering sharded weights for a sync, over 2 gloo processes on CPU (no Lightning): under FSDP2
(`fully_shard`, plain and LoRA) and FSDP (v1) with the decoder layers as units, read inside the root's
forward as Lightning's `training_step` runs, `engine_weights` gives every rank the unsharded model's weights,
value for value; outside the root's forward the root's parameters are shards, and the sync refuses them by
shape.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from opsd_lightning.rollout.sync import WeightSyncError, recorded
from opsd_lightning.rollout.weights import checkpoint_shapes, engine_weights

SHAPE = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "down_proj"]}


def tiny_model(adapters: bool) -> nn.Module:
    """The same model on every rank (seeded), LoRA B random so that the merge shows."""
    from opsd_lightning.models import build_tiny
    from opsd_lightning.models.lora import apply_peft

    torch.manual_seed(0)
    model = build_tiny(**SHAPE, seed=0).model
    if adapters:
        model = apply_peft(model, LORA)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.3)
    return model


def copied(model: nn.Module) -> dict[str, torch.Tensor]:
    # Cloned as they come: a gathered unit is released once the next one is read.
    return {name: tensor.clone() for name, tensor in engine_weights(model)}


class Root(nn.Module):
    """What Lightning wraps as the root FSDP unit: a module whose forward (`training_step`) generates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self) -> dict[str, torch.Tensor]:
        return copied(self.model)


def fsdp2(adapters: bool) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    model = tiny_model(adapters)
    decoder = model.get_base_model().model if adapters else model.model
    for layer in decoder.layers:
        fully_shard(layer)
    fully_shard(model)
    return copied(model)


def fsdp1() -> tuple[dict[str, torch.Tensor], str]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    model = tiny_model(adapters=False)
    root = FullyShardedDataParallel(
        Root(model),
        auto_wrap_policy=ModuleWrapPolicy({Qwen3DecoderLayer}),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    try:  # outside the root's forward: its own parameters (embedding, final norm) are shards
        list(recorded(engine_weights(root.model), checkpoint_shapes(model), []))
        refusal = ""
    except WeightSyncError as err:
        refusal = str(err)
    return root(), refusal


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        gathered, refusal = fsdp1()
        results = {
            "fsdp2": fsdp2(adapters=False),
            "fsdp2_lora": fsdp2(adapters=True),
            "fsdp1": gathered,
            "fsdp1_refusal": refusal,
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes importing transformers and peft: 18 s on 2 shared cores
def test_sharded_weights_are_gathered_whole_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    expected = {"plain": copied(tiny_model(adapters=False)), "lora": copied(tiny_model(adapters=True))}
    # Guard against a vacuous pass: the adapters change what is sent.
    assert not torch.equal(
        expected["lora"]["model.layers.0.self_attn.q_proj.weight"],
        expected["plain"]["model.layers.0.self_attn.q_proj.weight"],
    )
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for case, reference in (("fsdp2", "plain"), ("fsdp2_lora", "lora"), ("fsdp1", "plain")):
            weights = results[case]
            assert weights.keys() == expected[reference].keys(), (rank, case)
            for name, tensor in weights.items():
                assert torch.equal(tensor, expected[reference][name]), (rank, case, name)
        assert "model.embed_tokens.weight has shape" in results["fsdp1_refusal"], rank
        assert "not gathered" in results["fsdp1_refusal"]
