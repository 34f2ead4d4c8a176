"""Seeds handed to models: in [0, 2**31 - 1], distinct within a trial, reproducible; a model
that seeds the legacy ``numpy.random.RandomState`` (which refuses seeds >= 2**32) calibrates."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_simcal, write_config
from simcal.service import SEED_MODULUS, replicate_seed

SEEDS = st.integers(min_value=0, max_value=2**63 - 1)  # the config's seed range
TRIALS = st.text(min_size=0, max_size=12)


@given(seed=SEEDS, trial=TRIALS, first=st.integers(0, 10**6))
@settings(max_examples=200, deadline=None)
def test_replicate_seeds_of_a_trial_are_distinct_and_in_range(
    seed: int, trial: str, first: int
) -> None:
    seeds = [replicate_seed(seed, trial, i) for i in range(first, first + 200)]
    assert all(0 <= s <= 2**31 - 1 for s in seeds)
    assert len(set(seeds)) == len(seeds)
    for value in seeds[:3]:  # what models call with these seeds accepts them
        np.random.RandomState(value)
        random.Random(value)


def test_replicate_seeds_are_distinct_for_every_small_case() -> None:
    for seed in range(20):
        for trial in ("0", "1", "probe", "12345"):
            seeds = {replicate_seed(seed, trial, i) for i in range(2000)}
            assert len(seeds) == 2000
            assert max(seeds) < SEED_MODULUS


def test_replicate_seeds_are_reproducible_and_differ_between_trials_and_seeds() -> None:
    assert replicate_seed(42, "7", 3) == replicate_seed(42, "7", 3)
    assert replicate_seed(42, "7", 0) != replicate_seed(43, "7", 0)
    across = {replicate_seed(42, trial, i) for trial in map(str, range(50)) for i in range(20)}
    assert len(across) == 1000
    # neighbouring replicates' seeds are not evenly spaced
    a, b, c = (replicate_seed(42, "7", i) for i in range(3))
    assert (b - a) % SEED_MODULUS != (c - b) % SEED_MODULUS


LEGACY_MODEL = '''
import numpy as np

def simulate(params, seed):
    rng = np.random.RandomState(seed)  # refuses seeds outside [0, 2**32 - 1]
    return params["x"] + rng.normal(0.0, 0.01, 8)

def observed():
    return np.full(8, 0.3)
'''


def test_a_model_seeding_numpy_randomstate_calibrates(tmp_path: Path) -> None:
    (tmp_path / "legacy_model.py").write_text(textwrap.dedent(LEGACY_MODEL), encoding="utf-8")
    config = write_config(
        tmp_path,
        study="legacy",
        model="legacy_model:simulate",
        parameters={"x": {"low": 0.0, "high": 1.0}},
        targets=[{"name": "y", "observed": "legacy_model:observed"}],
        seed=2**62 + 12345,
        replicates=4,
        max_trials=6,
        sampler="random",
    )
    result = run_simcal(
        "run", "--config", str(config), "--workers", "2", "--metrics-port", "0",
        "--dashboard-address", ":0", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["n_completed"] == 6 and summary["n_failed"] == 0, summary
