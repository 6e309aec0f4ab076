"""Runs that meet a numerical fault or an interruption lose nothing: a non-finite step is skipped and
counted, too many in a row save a checkpoint and stop with a clear error; the same seed repeats a run."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from opsd_lightning.data import ArithDataModule
from opsd_lightning.training.module import OnPolicyModule
from tests.conftest import opsd_module, quiet_trainer


def poison_gradients(model: torch.nn.Module, calls: set[int]) -> list[int]:
    """Make the gradient of one weight NaN on the given backward calls (0-based); returns the call log."""
    seen: list[int] = []
    weight = next(p for name, p in model.named_parameters() if "q_proj" in name)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        seen.append(len(seen))
        return grad * float("nan") if seen[-1] in calls else grad

    weight.register_hook(hook)
    return seen


def fit(module: OnPolicyModule, root, steps: int, **trainer_kwargs) -> None:
    trainer = quiet_trainer(root, max_steps=steps, **trainer_kwargs)
    trainer.fit(module, datamodule=ArithDataModule(train_size=16, val_size=4, batch_size=2, seed=0))
    return trainer


def test_a_nonfinite_gradient_skips_the_step_and_counts_it(fresh_tiny, tmp_path):
    calls = poison_gradients(fresh_tiny.model, calls={0})
    module = opsd_module(fresh_tiny)
    trainer = fit(module, tmp_path, steps=2)
    assert trainer.global_step == 2 and len(calls) == 3  # 3 batches: one skipped, two steps taken
    assert module.nonfinite_steps == 1
    assert trainer.callback_metrics["train/nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in fresh_tiny.model.parameters())


def test_a_nonfinite_loss_skips_the_step(fresh_tiny, tmp_path):
    module = opsd_module(fresh_tiny)
    before = {k: v.clone() for k, v in fresh_tiny.model.state_dict().items()}
    original = module.micro_batch_loss

    def nan_loss(batch, micro_index):
        result = original(batch, micro_index)
        result.loss_sum = result.loss_sum * float("nan")
        return result

    module.micro_batch_loss = nan_loss
    trainer = fit(module, tmp_path, steps=1, max_epochs=1, limit_train_batches=2)
    assert trainer.global_step == 0 and module.nonfinite_steps == 2
    for key, value in fresh_tiny.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} moved on a skipped step"


def test_too_many_nonfinite_steps_in_a_row_save_a_checkpoint_and_stop(fresh_tiny, tmp_path):
    poison_gradients(fresh_tiny.model, calls={1, 2, 3, 4, 5})  # step 1 is good, then only faults
    module = opsd_module(fresh_tiny, max_nonfinite_steps_in_a_row=3)
    checkpoints = tmp_path / "checkpoints"
    callback = ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=100)
    message = r"3 optimizer steps in a row.*max_nonfinite_steps_in_a_row=3"
    with pytest.raises(FloatingPointError, match=message):
        fit(module, tmp_path, steps=10, callbacks=[callback], enable_checkpointing=True)
    good = {k: v.clone() for k, v in fresh_tiny.model.state_dict().items()}
    saved = torch.load(checkpoints / "nonfinite-step=1.ckpt", weights_only=False)
    assert saved["global_step"] == 1
    for key, value in good.items():  # the weights of the last good step, nothing lost
        torch.testing.assert_close(saved["state_dict"][f"model.{key}"], value, rtol=0, atol=0)


STEPS = 4


def signal_overrides(tmp_path) -> list[str]:
    from tests.cli.test_train import TINY

    return [o for o in TINY if not o.startswith("trainer.max_steps")] + [
        f"trainer.max_steps={STEPS}",
        "logger=none",
        "validate_before=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]


def run_and_signal(overrides: list[str], run_dir, signal_number: int | None, **env_vars: str) -> list[str]:
    """`opsd-train` in a subprocess; `signal_number` is sent once training has started. Returns the output
    and checks the exit status (128 + signal, or 0 without one)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **env_vars}
    command = [sys.executable, "-m", "opsd_lightning.cli.train", *overrides, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    signalled = False
    for line in process.stdout:
        output.append(line)
        # Once: a traceback quoting the announcing line must not send a second signal.
        if signal_number and not signalled and "saves a checkpoint after the current optimizer step" in line:
            process.send_signal(signal_number)
            signalled = True
    expected = 128 + signal_number if signal_number else 0
    assert process.wait(timeout=300) == expected, "".join(output[-30:])
    return output


def assert_same_final_weights(first, second) -> None:
    weights = [
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        for run in (first, second)
    ]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_run_saves_a_checkpoint_that_resumes_exactly(tmp_path, signal_number):
    """A real `opsd-train` in a subprocess gets the signal once training has started; resuming its
    checkpoint to the end gives bit-identical weights to an uninterrupted run."""
    from opsd_lightning.cli.train import train
    from tests.cli.test_configs import compose_train

    overrides = signal_overrides(tmp_path)
    output = run_and_signal(overrides, tmp_path / "cut", signal_number)
    interrupted = tmp_path / "cut" / "checkpoints" / "interrupted.ckpt"
    assert "Resume with the same overrides plus ckpt_path=" in "".join(output)
    cut_at = torch.load(interrupted, weights_only=False)["global_step"]
    assert 1 <= cut_at < STEPS  # stopped after a finished step, before the end

    straight = train(compose_train(overrides, tmp_path / "straight"))
    resumed = train(compose_train([*overrides, f"ckpt_path={interrupted}"], tmp_path / "resumed"))
    assert resumed["optimizer_steps"] == straight["optimizer_steps"] == STEPS
    assert_same_final_weights(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.slow  # ~30-70 s on 2 cores: make test-all
def test_slurms_requeue_signal_saves_at_a_step_boundary_and_the_requeued_job_resumes_exactly(tmp_path):
    """Under SLURM (its variables set; no `scontrol` here, so the requeue itself only logs a failure),
    Lightning's requeue signal is deferred to the end of the step; running the same command again, as the
    requeued job does, resumes from Lightning's hpc checkpoint to the same weights as a straight run."""
    from opsd_lightning.cli.train import train
    from tests.cli.test_configs import compose_train

    slurm = {
        "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "opsd", "SLURM_NODELIST": "localhost",
    }  # fmt: skip
    overrides = signal_overrides(tmp_path)
    output = run_and_signal(overrides, tmp_path / "job", signal.SIGUSR1, **slurm)
    (hpc,) = (tmp_path / "job").glob("hpc_ckpt_*.ckpt")
    assert 1 <= torch.load(hpc, weights_only=False)["global_step"] < STEPS
    assert "requeue" in "".join(output).lower()
    requeued = run_and_signal(overrides, tmp_path / "job", None, **slurm)  # the same command again
    # It resumed (a fresh start would end with the same weights too):
    assert f"Restoring states from the checkpoint path at {hpc}" in "".join(requeued)

    train(compose_train(overrides, tmp_path / "straight"))
    assert_same_final_weights(tmp_path / "straight", tmp_path / "job")


class RecordRollouts(Callback):
    """Saves every training rollout's completion ids to `path` (added by config: `+callbacks.record=...`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.completions: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        original = pl_module.rollout_source

        def rollout_source():
            source = original()

            def generate(*args, **kwargs):
                result = source.generate(*args, **kwargs)
                self.completions.append(result.completion_ids.clone())
                return result

            return dataclasses.replace(source, generate=generate)

        pl_module.rollout_source = rollout_source  # the sampler's rollouts: evaluation samples elsewhere

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.completions, self.path)


TIMINGS = ("seconds", "tokens_per_s")


def test_the_same_seed_gives_the_same_rollouts_and_metrics(tmp_path):
    """Two runs of one config on CPU: the same completions, the same metrics (wall time aside); a different
    seed changes them, so the comparison can fail."""
    from opsd_lightning.cli.train import train
    from tests.cli.test_configs import compose_train
    from tests.cli.test_train import TINY

    def run(name: str, seed: int) -> tuple[dict, list[torch.Tensor]]:
        rollouts = tmp_path / f"{name}.pt"
        overrides = [
            *TINY,
            "logger=none",
            f"seed={seed}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"+callbacks.record._target_={__name__}.RecordRollouts",
            f"+callbacks.record.path={rollouts}",
        ]
        metrics = train(compose_train(overrides, tmp_path / name))
        # Timings differ from run to run; everything else must not.
        metrics.pop("wall_seconds"), metrics.pop("output_dir")
        metrics["train"] = {k: v for k, v in metrics["train"].items() if not k.endswith(TIMINGS)}
        return metrics, torch.load(rollouts)

    first, first_rollouts = run("first", seed=0)
    second, second_rollouts = run("second", seed=0)
    other, other_rollouts = run("other", seed=1)
    assert len(first_rollouts) == 2 and first_rollouts[0].numel() > 0
    assert all(torch.equal(a, b) for a, b in zip(first_rollouts, second_rollouts, strict=True))
    assert sorted(first["train"]) == sorted(second["train"]) and "train/loss" in first["train"]
    assert first == second, {
        k: (v, second["train"][k]) for k, v in first["train"].items() if v != second["train"][k]
    }
    assert not all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(first_rollouts, other_rollouts, strict=True)
    )
    assert other != first
