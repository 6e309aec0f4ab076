"""DDP over 2 CPU processes (gloo): each rank trains on its own problems, the loss is the token mean over
both ranks, and the weights after a step equal a single process's on the concatenated batch."""

from __future__ import annotations

import functools
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader

from opsd_lightning.data.arith import generate_examples
from opsd_lightning.data.datamodule import collate_raw_text
from opsd_lightning.objectives import Distill, ForwardKL
from opsd_lightning.rollout.samplers import SingleSampler
from tests.conftest import build_small_tiny, opsd_module, policy_module, quiet_trainer

ROWS = generate_examples(4, seed=0, num_steps=(2, 3), max_start=12, max_change=6)


class ShardedRows(L.LightningDataModule):
    """A fixed, uneven split: with 2 ranks, rank 0 trains on 1 problem and rank 1 on 3, so the ranks hold
    different token counts and a per-rank mean would differ from the global token mean."""

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = ROWS if world == 1 else (ROWS[:1] if rank == 0 else ROWS[1:])
        return DataLoader(rows, batch_size=len(rows), collate_fn=collate_raw_text)


class RecordRank(L.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        (self.folder / f"problems-{trainer.global_rank}.txt").write_text("\n".join(batch["problem"]))

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        loss = trainer.callback_metrics["train/loss"].item()
        generated = pl_module.generated_tokens
        torch.save(
            {"state": state, "loss": loss, "generated": generated},
            self.folder / f"rank-{trainer.global_rank}.pt",
        )


def train_one_step(folder: Path, devices: int) -> None:
    module = opsd_module(
        build_small_tiny(),
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        # Greedy rollouts depend on the prompt only, so both setups generate the same completions even
        # though rollout seeds differ by rank. Lengths differ between problems: the token mean must count.
        sampling={"temperature": 0.0, "max_new_tokens": 12},
        gradient_clip_val=None,
    )
    trainer = quiet_trainer(
        folder,
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=1,
        use_distributed_sampler=False,
        callbacks=[RecordRank(folder)],
    )
    trainer.fit(module, datamodule=ShardedRows())


def test_ddp_token_mean_matches_one_process_on_the_concatenated_batch(tmp_path):
    (tmp_path / "single").mkdir()
    (tmp_path / "ddp").mkdir()
    train_one_step(tmp_path / "single", devices=1)
    train_one_step(tmp_path / "ddp", devices=2)

    rank_problems = [(tmp_path / "ddp" / f"problems-{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert not set(rank_problems[0]) & set(rank_problems[1]), "ranks must see different problems"
    assert sorted(rank_problems[0] + rank_problems[1]) == sorted(r["problem"] for r in ROWS)

    single = torch.load(tmp_path / "single" / "rank-0.pt")
    ranks = [torch.load(tmp_path / "ddp" / f"rank-{r}.pt") for r in (0, 1)]
    # The logged loss is the global token mean: the same number on both ranks and in one process. It is
    # ~1e-4 per token (a KL of two close distributions), where float32 cancellation leaves ~1e-5 relative.
    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert ranks[0]["loss"] == pytest.approx(single["loss"], rel=1e-3)
    # The generated tokens are counted over both ranks (summed at the optimizer step), as in one process.
    assert ranks[0]["generated"] == ranks[1]["generated"] == single["generated"] > 0
    moved = 0
    for name, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][name], ranks[1]["state"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-6)
    initial = build_small_tiny()
    for name, value in initial.model.state_dict().items():
        moved += not torch.equal(value, single["state"][name])
    assert moved > 0, "the step must change the weights, or the comparison proves nothing"


class TwoRowsPerRank(L.LightningDataModule):
    """Rank r of 2 trains on problems 2r and 2r+1 (with `micro_batch_size=1`: two slices per rank and
    step); one process trains on all four."""

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = ROWS if world == 1 else ROWS[2 * rank : 2 * rank + 2]
        return DataLoader(rows, batch_size=len(rows), collate_fn=collate_raw_text)


SYNCED_BACKWARDS = 0  # in each spawned rank: backwards whose gradients DDP all-reduced


def count_synced_backwards(state, bucket):
    global SYNCED_BACKWARDS
    SYNCED_BACKWARDS += bucket.is_last()  # every bucket of a synced backward passes here; count the last
    return allreduce_hook(state, bucket)


class CountSyncedBackwards(L.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registers `ddp_comm_hook` on CUDA only; on CPU (gloo) register it here.
        trainer.strategy.model.register_comm_hook(None, count_synced_backwards)

    def on_train_end(self, trainer, pl_module) -> None:
        (self.folder / f"synced-{trainer.global_rank}.txt").write_text(str(SYNCED_BACKWARDS))


def train_two_steps(folder: Path, devices: int, micro_batch_size: int | None) -> None:
    module = opsd_module(
        build_small_tiny(),
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        sampling={"temperature": 0.0, "max_new_tokens": 12},
        gradient_clip_val=None,
        micro_batch_size=micro_batch_size,
    )
    callbacks = [RecordRank(folder)] + ([CountSyncedBackwards(folder)] if devices > 1 else [])
    trainer = quiet_trainer(
        folder,
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=2,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=TwoRowsPerRank())


def test_micro_batch_slices_all_reduce_once_per_step_with_the_same_weights(tmp_path):
    """With `micro_batch_size` under DDP, every slice but the last backpropagates under `no_sync`: one
    gradient all-reduce per optimizer step instead of one per slice, and the same weights as one process
    training on the whole batch (which equals DDP without slices, see the first test)."""
    (tmp_path / "single").mkdir()
    (tmp_path / "sliced").mkdir()
    train_two_steps(tmp_path / "single", devices=1, micro_batch_size=None)
    train_two_steps(tmp_path / "sliced", devices=2, micro_batch_size=1)

    for rank in (0, 1):  # 2 optimizer steps of 2 slices each
        assert (tmp_path / "sliced" / f"synced-{rank}.txt").read_text() == "2", f"rank {rank}"
    single = torch.load(tmp_path / "single" / "rank-0.pt")
    sliced = [torch.load(tmp_path / "sliced" / f"rank-{r}.pt") for r in (0, 1)]
    assert sliced[0]["loss"] == pytest.approx(single["loss"], rel=1e-3)
    for name, value in single["state"].items():
        torch.testing.assert_close(sliced[0]["state"][name], sliced[1]["state"][name], rtol=0, atol=0)
        torch.testing.assert_close(sliced[0]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    initial = build_small_tiny().model.state_dict()
    assert any(not torch.equal(initial[name], value) for name, value in single["state"].items())


@pytest.mark.slow  # ~30-70 s on 2 cores: make test-all
def test_ddp_resume_continues_each_ranks_shard_exactly(tmp_path):
    """2 ranks: 4 steps straight equal 2 steps + checkpoint + 2 resumed steps, and every rank trains on
    its own shard of the datamodule's order (Lightning keeps our sampler instead of swapping in its own)."""
    from tests.training.test_resume import run

    straight = run(4, tmp_path / "straight", devices=2)
    run(2, tmp_path / "first", save_every=2, devices=2)
    (checkpoint,) = (tmp_path / "first").glob("*.ckpt")
    resumed = run(4, tmp_path / "resumed", ckpt_path=str(checkpoint), devices=2)

    def seen(folder: str, rank: int) -> list[str]:
        return (tmp_path / folder / f"problems-{rank}.txt").read_text().splitlines()

    for rank in (0, 1):
        assert seen("first", rank) + seen("resumed", rank) == seen("straight", rank)
    # 16 problems, 2 ranks, 4 steps of 2 micro-batches of 2: each epoch splits the problems in two halves.
    epoch_one = [seen("straight", rank)[:8] for rank in (0, 1)]
    assert len(set(epoch_one[0]) | set(epoch_one[1])) == 16, "ranks must see different problems"
    for key, value in straight.items():
        if key != "generated_tokens":  # counted in the spawned processes, not copied back
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_opsd_trains_wrapper_passes_the_trainer_to_the_training_data_for_its_shard():
    """`opsd-train` wraps the datamodule with the benchmarks; the wrapped one must still see the trainer
    (its DDP rank, its progress for checkpoints), or every rank would train on the same problems."""
    from types import SimpleNamespace

    from opsd_lightning.data import ArithDataModule
    from opsd_lightning.evaluation.loaders import WithBenchmarks

    data = WithBenchmarks(ArithDataModule(train_size=8, val_size=4, batch_size=2, seed=0), [], 1)
    data.setup("fit")
    data.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    sampler = data.train_dataloader().sampler
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (2, 1, 4)


class SignalOnRankOne(L.Callback):
    """Acts as if rank 1 alone received SIGTERM during its second batch (what GracefulStop's handler
    records), to check that the stop is a collective decision."""

    def __init__(self, stop) -> None:
        self.stop = stop

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and batch_idx == 1:
            self.stop._signal = signal.SIGTERM


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from opsd_lightning.data import ArithDataModule
    from opsd_lightning.training.callbacks import GracefulStop

    module = opsd_module(build_small_tiny())
    stop = GracefulStop()
    trainer = quiet_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_steps=6,
        enable_checkpointing=True,
        callbacks=[stop, SignalOnRankOne(stop), ModelCheckpoint(dirpath=tmp_path / "checkpoints")],
    )
    # Rank 0 never saw a signal; without the all-reduce it would train on while rank 1 waits: a hang.
    with pytest.raises(Exception, match="SIGTERM at optimizer step 2"):
        trainer.fit(module, datamodule=ArithDataModule(train_size=16, val_size=4, batch_size=2, seed=0))
    saved = torch.load(tmp_path / "checkpoints" / "interrupted.ckpt", weights_only=False)
    assert saved["global_step"] == 2


class OneRankWithoutReferences(ShardedRows):
    """Rank 1's problems have no reference solution, which the reference teacher context refuses."""

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        rows = [{**row, "solution": None if rank == 1 else row["solution"]} for row in ROWS[:2]]
        return DataLoader(rows, batch_size=len(rows), collate_fn=collate_raw_text)


class OneRankWithoutSolutionKey(ShardedRows):
    """Rank 1's batches lack the `solution` key: refused in a phase of its own, before sampling."""

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank

        def collate(rows):
            batch = collate_raw_text(rows)
            return {k: v for k, v in batch.items() if k != "solution"} if rank == 1 else batch

        return DataLoader(ROWS[:2], batch_size=2, collate_fn=collate)


class RefusesOnRankOne(SingleSampler):
    """A sampler that refuses before generating, on rank 1 only: rank 0 generates and counts its tokens."""

    def sample(self, batch, source, seed):
        if torch.distributed.get_rank() == 1:
            raise ValueError("rank 1's sampler refuses this batch")
        return super().sample(batch, source, seed)


@pytest.mark.parametrize(
    ("datamodule", "sampler", "message"),
    [
        (OneRankWithoutReferences, None, "a training problem has no reference"),
        (OneRankWithoutSolutionKey, None, r"a training batch has keys \['answer', 'problem'\]"),
        (ShardedRows, RefusesOnRankOne(), "rank 1's sampler refuses this batch"),
    ],
    ids=["no-reference", "no-solution-key", "sampler-refuses"],
)
def test_a_refusal_on_one_rank_stops_every_rank_with_its_message(tmp_path, datamodule, sampler, message):
    """Without the collective decision rank 0 would wait for rank 1 in the next all-reduce until the
    process-group timeout (set short here, so a regression fails instead of hanging)."""
    import datetime

    from lightning.pytorch.strategies import DDPStrategy

    strategy = DDPStrategy(start_method="spawn", timeout=datetime.timedelta(seconds=60))
    trainer = quiet_trainer(
        tmp_path, devices=2, strategy=strategy, max_steps=1, use_distributed_sampler=False
    )
    loaded = build_small_tiny()
    terms = [Distill(ForwardKL())]
    module = opsd_module(loaded) if sampler is None else policy_module(loaded, terms, sampler)
    with pytest.raises(Exception, match=r"rank 1 \(of 1 refusing\): " + message):
        trainer.fit(module, datamodule=datamodule())
