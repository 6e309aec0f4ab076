"""The README's main job: the embedded default must raise held-out accuracy (slow: ~3 min on 2 cores)."""

from __future__ import annotations

import pytest

from tests.cli.test_configs import compose_train


@pytest.mark.slow
def test_default_job_raises_held_out_accuracy(tmp_path):
    from opsd_lightning.cli.train import train

    cfg = compose_train([f"paths.cache_dir={tmp_path / 'cache'}", "callbacks=none"], tmp_path)
    metrics = train(cfg)
    assert metrics["benchmarks"]["heldout"] >= 200
    base, final = metrics["base"]["val/heldout/avg@4"], metrics["final"]["test/heldout/avg@4"]
    assert 0.2 <= base <= 0.7, f"the warm-up base should be a moderate solver, got {base:.3f}"
    # 800 samples per evaluation: a 5-point gain is well above the noise of the same seeds.
    assert final >= base + 0.05, f"OPSD should raise held-out accuracy: {base:.3f} -> {final:.3f}"
