"""A resumed run continues exactly: 4 steps straight give the same weights as 2 steps, a checkpoint, a new
process state, and 2 more steps from `ckpt_path` (optimizer, scheduler, EMA teacher, RNG, data position)."""

from __future__ import annotations

import functools

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from opsd_lightning.data import ArithDataModule
from opsd_lightning.data.sampler import ResumableRandomSampler
from opsd_lightning.teachers.modes import EMATeacher
from tests.conftest import build_small_tiny, opsd_module, quiet_trainer


class RecordProblems(Callback):
    """Append each rank's training problems to `problems-<rank>.txt` in `folder`."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.folder / f"problems-{trainer.global_rank}.txt", "a") as file:
            file.write("".join(problem + "\n" for problem in batch["problem"]))


def run(
    steps: int, root, ckpt_path=None, save_every: int | None = None, devices: int = 1
) -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)  # the global stream differs between the two processes being compared
    module = opsd_module(
        build_small_tiny(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        teacher=EMATeacher(decay=0.5),
        accumulate_grad_batches=2,
    )
    root.mkdir(parents=True, exist_ok=True)
    callbacks = [RecordProblems(root)]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=save_every))
    trainer = quiet_trainer(
        root,
        max_steps=steps,
        callbacks=callbacks,
        enable_checkpointing=bool(save_every),
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
    )
    # 16 problems in batches of 2 with 2 micro-batches per step: 4 steps per epoch, so 4 steps cross none
    # and the resume lands mid-epoch.
    trainer.fit(
        module,
        datamodule=ArithDataModule(train_size=16, val_size=4, batch_size=2, seed=0),
        ckpt_path=ckpt_path,
    )
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    state["generated_tokens"] = torch.tensor(module.generated_tokens)
    return state


def test_two_steps_then_resume_equals_four_straight(tmp_path):
    straight = run(4, tmp_path / "straight")
    run(2, tmp_path / "first", save_every=2)
    (checkpoint,) = (tmp_path / "first").glob("*.ckpt")
    resumed = run(4, tmp_path / "resumed", ckpt_path=str(checkpoint))
    assert straight.keys() == resumed.keys()
    assert any("shadow" in key for key in straight)  # the EMA teacher's weights are compared too
    for key, value in straight.items():
        # Exact on CPU: same rollouts (seeded by step), same data, same optimizer and scheduler state.
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_the_loader_skips_to_an_epoch_and_a_position_in_the_shuffle_order_of_a_plain_loader():
    rows = list(range(10))
    plain = torch.utils.data.DataLoader(
        rows, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    epochs = [[int(b) for b in plain] for _ in range(3)]
    sampler = ResumableRandomSampler(rows, generator=torch.Generator().manual_seed(3))
    resumed = torch.utils.data.DataLoader(rows, batch_size=1, sampler=sampler, generator=sampler.generator)
    sampler.fast_forward(epochs=2, samples=4)
    assert [int(b) for b in resumed] == epochs[2][4:]
    fresh = ResumableRandomSampler(rows, generator=torch.Generator().manual_seed(3))
    loader = torch.utils.data.DataLoader(rows, batch_size=1, sampler=fresh, generator=fresh.generator)
    assert [[int(b) for b in loader] for _ in range(3)] == epochs  # no skip: exactly the plain order


def test_ranks_take_disjoint_shards_of_one_order_and_resume_inside_their_own_shard():
    rows = list(range(7))  # uneven over 2 ranks: the shorter shard is padded with the first index
    order = list(ResumableRandomSampler(rows, generator=torch.Generator().manual_seed(5)))
    shards = [
        list(ResumableRandomSampler(rows, generator=torch.Generator().manual_seed(5), num_replicas=2, rank=r))
        for r in (0, 1)
    ]
    assert shards == [order[0::2], order[1::2] + order[:1]]
    assert len(shards[0]) == len(shards[1]) == 4  # equal batch counts, or DDP would hang
    rank1 = ResumableRandomSampler(rows, generator=torch.Generator().manual_seed(5), num_replicas=2, rank=1)
    rank1.fast_forward(epochs=0, samples=2)  # two per-rank samples already trained on
    assert list(rank1) == shards[1][2:]
