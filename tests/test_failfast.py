"""Fail fast during a run: ``stop_after_failures`` alike failures in a row stop it (exit 3).

The streak is driven through :class:`Calibration`'s ``gather`` seam (batch mode) on the
session's LocalCluster: the trials' tasks run for real, their outcomes are replaced by the
errors under test. The command-line test runs ``simcal run`` on a local model that fails every
trial alike but passes the probe.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
from distributed import Client, Future

from conftest import run_simcal, write_config
from simcal.config import validate_config
from simcal.driver import Calibration, RunStats
from simcal.failfast import STOP_REASON, FailureStreak
from simcal.failures import FailureReason
from simcal.metrics import Metrics
from simcal.samplers import make_sampler
from simcal.service import SimulationService
from simcal.storage import open_study

SIM = FailureReason.SIMULATION_ERROR


def test_the_streak_counts_alike_failures_and_ends_on_success() -> None:
    streak = FailureStreak(3)
    assert streak.failed(SIM, "KeyError: 'gamma'") is None
    assert streak.failed(SIM, "KeyError: 'gamma'") is None
    streak.succeeded()
    assert streak.failed(SIM, "KeyError: 'gamma'") is None
    assert streak.failed(SIM, "KeyError: 'beta'") is None  # another error: a new streak
    assert streak.failed(FailureReason.TIMEOUT, "TimeoutError: trial exceeded") is None
    late = "ModelImportError: worker tcp://h:1: No module named 'm'"  # one late worker's
    assert streak.failed(FailureReason.MODEL_IMPORT, late) is None
    assert streak.failed(SIM, "KeyError: 'beta'") is None
    cause = streak.failed(SIM, "KeyError: 'beta'")
    assert cause == (
        f"{STOP_REASON}: 3 consecutive trials failed with the same error "
        "(simulation_error: KeyError: 'beta')"
    )
    never = FailureStreak(0)
    assert all(never.failed(SIM, "KeyError: 'x'") is None for _ in range(100))


def _calibrate(
    client: Client, tmp_path: Path, errors: Sequence[BaseException | None], **fields: object
) -> RunStats:
    """A batch run whose n-th told aggregation outcome is ``errors[n]`` (None: the real one)."""
    tmp_path.mkdir(exist_ok=True)
    config = validate_config(
        {
            "study": "streak",
            "model": "simcal.models.synthetic:simulate",
            "parameters": {"x": {"low": 0.0, "high": 1.0}},
            "replicates": 1,
            "seed": 3,
            "sampler": "random",
            "mode": "batch",
            "max_in_flight": 2,
            "targets": [{"name": "y", "observed": "simcal.models.synthetic:observed"}],
            "max_trials": len(errors),
            "storage": f"sqlite:///{tmp_path / 'study.db'}",
            **fields,
        }
    )
    service = SimulationService(client)
    served = iter(errors)

    def gather(futures: Sequence[Future], timeout: float | None) -> list[object]:
        real = service.gather(futures, timeout=timeout)
        return [e if (e := next(served)) is not None else r for r in real]

    study = open_study(config.storage, config.study, make_sampler(config.sampler, config.seed))
    return Calibration(config, service, study, Metrics(config.study), gather=gather).run()


def test_alike_failures_in_a_row_stop_the_run(client: Client, tmp_path: Path) -> None:
    stats = _calibrate(client, tmp_path, [KeyError("gamma")] * 20, stop_after_failures=4)
    assert stats.failed == 4 and stats.completed == 0
    assert stats.stop_reason == (
        f"{STOP_REASON}: 4 consecutive trials failed with the same error "
        "(simulation_error: KeyError: 'gamma')"
    )


def test_a_success_between_them_or_zero_never_stops(client: Client, tmp_path: Path) -> None:
    every_fourth_completes = ([KeyError("gamma")] * 3 + [None]) * 3
    stats = _calibrate(client, tmp_path / "a", every_fourth_completes, stop_after_failures=4)
    assert (stats.failed, stats.completed, stats.stop_reason) == (9, 3, "max_trials")
    stats = _calibrate(client, tmp_path / "b", [KeyError("gamma")] * 8, stop_after_failures=0)
    assert (stats.failed, stats.stop_reason) == (8, "max_trials")
    varying = [KeyError(f"k{n}") for n in range(8)]  # not the same error
    stats = _calibrate(client, tmp_path / "c", varying, stop_after_failures=2)
    assert (stats.failed, stats.stop_reason) == (8, "max_trials")


OFF_CENTRE = '''
import numpy as np

def simulate(params, seed):
    if params["x"] != 0.5:  # the probe's point (the midpoint) works, every trial fails alike
        return {"y": np.zeros(16), "z": params["gamma"]}
    return np.zeros(16)
'''


def test_run_stops_after_alike_failures_with_exit_3_and_a_one_line_cause(
    tmp_path: Path,
) -> None:
    (tmp_path / "offcentre.py").write_text(textwrap.dedent(OFF_CENTRE), encoding="utf-8")
    config = write_config(
        tmp_path,
        study="streak",
        model="offcentre:simulate",
        parameters={"x": {"low": 0.0, "high": 1.0}},
        replicates=1,
        sampler="random",
        max_trials=40,
        stop_after_failures=3,
    )
    result = run_simcal(
        "run", "--config", str(config), "--workers", "2", "--metrics-port", "0",
        "--dashboard-address", ":0",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    cause = (
        f"{STOP_REASON}: 3 consecutive trials failed with the same error "
        "(simulation_error: KeyError: 'gamma')"
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("simcal: error:")]
    assert len(errors) == 1 and cause in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["this_run"]["stop_reason"] == cause
    assert 3 <= summary["n_failed"] < 40  # the budget was not burnt
    assert summary["n_trials"] + summary["n_interrupted"] <= 40


@pytest.mark.parametrize("value", [-1, 1.5, "ten"])
def test_stop_after_failures_must_be_a_count(tmp_path: Path, value: object) -> None:
    result = run_simcal("check-config", str(write_config(tmp_path, stop_after_failures=value)))
    assert result.returncode == 2 and "stop_after_failures" in result.stderr, result.stderr
