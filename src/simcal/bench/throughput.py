"""Calibration throughput: the real driver on the synthetic workload, mode by mode.

Each run asks new trials for a fixed time, then lets those in flight finish. The rate is
the steady one (:func:`~simcal.bench.workload.steady_rate` over completion times), its
efficiency the ratio to the workload's ideal bound.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import optuna
from distributed import Client
from optuna.trial import TrialState

from simcal.bench.strategies import BASELINES, SIMCAL, all_strategies
from simcal.bench.workload import Workload, steady_rate
from simcal.driver import Calibration
from simcal.metrics import Metrics
from simcal.progress import ProgressReporter, Snapshot
from simcal.samplers import make_sampler
from simcal.service import SimulationService
from simcal.storage import open_study

log = logging.getLogger(__name__)

STREAMING = "streaming"
STORAGES = ("memory", "sqlite")


class _Silent(ProgressReporter):
    """No progress lines from the driver: the benchmark reports its own."""

    def update(self, snapshot: Snapshot, *, force: bool = False) -> None:
        return None


def mode_names() -> list[str]:
    """``streaming``, then ``batch/<strategy>`` for every gather strategy."""
    return [STREAMING, *(f"batch/{name}" for name in [*BASELINES, SIMCAL])]


def _study(storage: str, directory: str, name: str, seed: int) -> optuna.Study:
    """``memory``, ``sqlite`` (a temporary file) or any storage URL (a study of its own)."""
    sampler = make_sampler("tpe", seed)
    if storage == "memory":
        return optuna.create_study(study_name=name, sampler=sampler, direction="minimize")
    if "://" in storage:
        return open_study(storage, f"{name}-{time.time_ns()}", sampler)
    return open_study(f"sqlite:///{directory}/bench.db", name, sampler)


def calibration_throughput(
    client: Client, workload: Workload, mode: str, seconds: float, storage: str = "memory"
) -> dict[str, Any]:
    """Run one calibration in ``mode`` for ``seconds`` and measure its throughput."""
    service = SimulationService(client)
    strategy = mode.removeprefix("batch/")
    gather = None if mode == STREAMING else all_strategies(service)[strategy]
    config = workload.config(mode="streaming" if gather is None else "batch", seconds=seconds)
    with tempfile.TemporaryDirectory(prefix="simcal-bench-") as directory:
        study = _study(storage, directory, config.study, config.seed)
        calibration = Calibration(
            config, service, study, Metrics(config.study), progress=_Silent(), gather=gather
        )
        cpu, wall = time.process_time(), time.perf_counter()
        stats = calibration.run()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        times = [trial.datetime_complete.timestamp() for trial in completed]
    rate = steady_rate(times) * 60
    ideal = workload.ideal_trials_per_minute()
    row = {
        "workers": workload.workers,
        "duration": workload.duration,
        "replicates": workload.replicates,
        "mode": mode,
        "storage": storage,
        "completed": stats.completed,
        "failed": stats.failed,
        "elapsed_seconds": round(wall, 3),
        "trials_per_minute": rate,
        "end_to_end_trials_per_minute": stats.completed * 60 / wall,
        "ideal_trials_per_minute": ideal,
        "efficiency": rate / ideal,
        "replicate_tasks_per_second": rate * workload.replicates / 60,
        "driver_cpu_seconds_per_trial": cpu / max(stats.completed, 1),
    }
    log.info(
        "throughput %s %-26s %7.1f trials/min  efficiency %.3f  driver CPU %.1f ms/trial",
        workload.label,
        mode,
        rate,
        row["efficiency"],
        row["driver_cpu_seconds_per_trial"] * 1000,
    )
    return row
