"""One training step of every algorithm-config combination gives the loss and gradient norm recorded before
the refactor of `opsd_lightning.algorithms` (`tests/golden/step_values.json`, written by
`tests/golden/record_step_values.py`, which says how each value is made: a tiny random Qwen3 in float64, the
real Hydra configs, SGD with lr 1 through a real Trainer).

The fast suite checks a covering subset (every algorithm, divergence, teacher, weighting, backend, mode,
extra option and reward kind at least once, and a rejected and a failing combination); `make test-all` checks
every other combination too (about 5 minutes on 2 cores).

Re-record only on purpose (a deliberate change of the numbers), never to make this test pass after a
refactor: `.venv/bin/python tests/golden/record_step_values.py --out tests/golden/step_values.json`. New
config options: record their combinations alone with `--only ... --merge`. A renamed or moved option: map
the old override to the new one in `record_step_values.OVERRIDE_TRANSLATIONS` (the keys keep the spelling
they were recorded with, at the commit in the JSON's `recorded_with`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tests.golden import record_step_values as golden

RECORDED = json.loads(golden.DEFAULT_OUT.read_text())
COMBINATIONS: dict[str, dict[str, Any]] = RECORDED["combinations"]


# ---- tolerances --------------------------------------------------------------------------------------
# Run to run on one machine the values are bitwise equal; the tolerances are for other CPUs (another SIMD
# kernel set sums in another order) and for a refactor that only reorders sums. A reordered sum of n terms
# moves by up to n·eps·Σ|t| (worst case) and by about sqrt(n)·eps·Σ|t| (roundings add up as a random walk).
#
# float64 (eps 2.2e-16), the OPSD/SSOPD objectives: every weight and activation is float64 (see
# record_step_values). The loss is a mean over <= 96 completion tokens of divergences between two nearly
# equal distributions (~1e-5), each a sum over the 370 vocabulary entries of terms whose sizes add up to
# Σ_v (p_T + p_S)(|log p_T| + |log p_S|) <= 4 ln 370 ~ 24 per token: a reordering moves the loss by about
# eps x 24 x ~20 roundings in a row (log-softmax, difference, product, sums) ~ 1e-13 absolute (abs 1e-13;
# measured: 1.6e-16 between AVX-512 and ATEN_CPU_CAPABILITY=default). A gradient entry sums ~1e4 such
# products (tokens x vocabulary, through two layers) with the same cancellation (|p_T - p_S| ~ 1e-3·p): about
# sqrt(1e4) x 2.2e-16 x 1e3 ~ 2e-11 relative; rel 1e-9 leaves a factor 50 (measured: 1.4e-15).
FLOAT64 = {"rel": 1e-9, "abs": 1e-13}
# float32 (eps 1.2e-7), where the step goes through the package's own `.float()` (`groups.token_log_probs`:
# GRPO and the hybrid's policy term and RLSD weights; SFT's log-softmax): a float32 log-softmax over 370
# entries and its gradient are ~8 roundings in a row, eps32 x 8 ~ 1e-6 relative per token (rel 1e-6). The
# policy loss is a sum of -A·ratio over ~96 tokens, advantages |A| ~ 1 of mean exactly 0 per group and ratios
# exactly 1: float32 noise around 0 (~1e-9), whose bound is absolute, eps32 x (Σ|A·ratio| / tokens = 1) x 8
# ~ 1e-6 (abs 1e-6, loss only: a gradient norm has no cancellation). Measured between AVX-512 and
# ATEN_CPU_CAPABILITY=default: 6e-10 relative (the float32 parts rarely round differently).
FLOAT32 = {"rel": 1e-6, "abs": 1e-6}
FLOAT32_ALGORITHMS = {"sft", "grpo", "hybrid"}  # ssopd has reward_weight 0: no policy term, all float64


def tolerance(key: str, quantity: str) -> dict[str, float]:
    combination = golden.Combination.from_key(key)
    algorithm = next(o.split("=", 1)[1] for o in combination.overrides if o.startswith("algorithm="))
    reward_off = "algorithm.reward_weight=0" in combination.overrides
    if algorithm in FLOAT32_ALGORITHMS and not reward_off:
        return FLOAT32 if quantity == "loss" else {"rel": FLOAT32["rel"], "abs": FLOAT64["abs"]}
    return FLOAT64


# ---- the subsets -------------------------------------------------------------------------------------
def recorded(key: str) -> bool:
    """Whether the combination ran (not rejected by the checks, nor failing)."""
    return "loss" in COMBINATIONS[key]


def fast_subset() -> list[str]:
    """Recorded combinations holding every `name=value` of any recorded key at least once, then the first
    rejected and the first failing combination."""
    chosen = golden.covering_subset([key for key in COMBINATIONS if recorded(key)])
    for outcome in ("rejected", "error"):
        chosen += [key for key, values in COMBINATIONS.items() if outcome in values][:1]
    return chosen


FAST = fast_subset()
SLOW = [key for key in COMBINATIONS if key not in FAST]


def param_id(key: str) -> str:
    """The key with commas for spaces (`-k` can select by any of its `name=value`s)."""
    return key.replace(golden.HARNESS_SEPARATOR, ",").replace(" ", ",")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with golden.one_thread():
        yield


def check(key: str) -> None:
    expected = COMBINATIONS[key]
    result = golden.run_combination(
        golden.Combination.from_key(key),
        base=RECORDED["base_overrides"],
        sampling=RECORDED["sampling_overrides"],
    )
    if "rejected" in expected:
        # The wording may change; the combination must still be refused with a ValueError.
        assert "rejected" in result, f"was rejected ({expected['rejected']!r}); now {result}"
        return
    if "error" in expected:
        assert "error" in result, (
            f"raised {expected['error']!r} when recorded; now it runs: {result}. If the refactor fixed that "
            "on purpose, record this combination again with record_step_values.py --only ... --merge"
        )
        assert result["error"].split(":")[0] == expected["error"].split(":")[0], result["error"]
        return
    assert "rejected" not in result and "error" not in result, result
    steps = [(expected, result)]
    if "steps" in expected:
        assert len(result.get("steps", [])) == len(expected["steps"]), result
        steps += list(zip(expected["steps"], result["steps"], strict=True))
    for want, got in steps:
        assert got["trained_tokens"] == want["trained_tokens"], (want, got)
        for quantity in ("loss", "grad_norm"):
            assert math.isfinite(got[quantity]), (quantity, got)
            bounds = tolerance(key, quantity)
            difference = abs(got[quantity] - want[quantity]) / max(abs(want[quantity]), 1e-300)
            assert got[quantity] == pytest.approx(want[quantity], **bounds), (
                f"{quantity}: {got[quantity]!r}, recorded {want[quantity]!r} (relative difference "
                f"{difference:.2e}, tolerance {bounds})"
            )


# ---- tests -------------------------------------------------------------------------------------------
def test_every_config_option_is_recorded():
    """An option of a config group (a new `conf/divergence/*.yaml`, say) that no recorded combination uses
    would go untested without a word. Checked per option, not against today's `grid()`, which reads the
    algorithm configs' shape: a refactor of those configs changes the grid, not what was recorded."""
    used = {token for key in COMBINATIONS for token in golden.Combination.from_key(key).tokens}
    missing = [
        f"{group}={option}"
        for group in ("algorithm", "divergence", "teacher", "weighting")
        for option in golden.options(group)
        if f"{group}={option}" not in used
    ]
    assert not missing, (
        f"no recorded combination uses {missing}: record theirs with tests/golden/record_step_values.py "
        "--only <option> --out tests/golden/step_values.json --merge"
    )


def test_the_fast_subset_covers_every_option():
    def tokens(keys: list[str]) -> set[str]:
        return {token for key in keys for token in golden.Combination.from_key(key).tokens}

    assert tokens([k for k in FAST if recorded(k)]) == tokens([k for k in COMBINATIONS if recorded(k)])
    assert tokens(FAST) == tokens(list(COMBINATIONS))
    # Every kind of outcome recorded (a refusal; a crash, while one is recorded) is in the subset too.
    kinds = {"rejected", "error"}
    recorded_kinds = {outcome for value in COMBINATIONS.values() for outcome in value} & kinds
    assert recorded_kinds <= {outcome for key in FAST for outcome in COMBINATIONS[key]}
    assert len(FAST) + len(SLOW) == len(COMBINATIONS) and len(FAST) < 30


@pytest.mark.parametrize("key", FAST, ids=param_id)
def test_a_step_gives_the_recorded_loss_and_gradient_norm(key):
    check(key)


@pytest.mark.slow  # the other 735 combinations, ~5 min on 2 cores: make test-all
@pytest.mark.parametrize("key", SLOW, ids=param_id)
def test_every_other_combination_gives_the_recorded_values(key):
    check(key)
