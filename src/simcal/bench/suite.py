"""What one ``simcal bench`` run measures (quick, default or full settings) and in what order."""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import dask

from simcal.bench.checks import check_targets
from simcal.bench.gather_bench import gather_costs
from simcal.bench.optimizer_cost import ask_tell_cost
from simcal.bench.raw_dask import raw_task_rate
from simcal.bench.report_cost import live_report_cost
from simcal.bench.throughput import STORAGES, calibration_throughput, mode_names
from simcal.bench.workload import Workload, aggregation_seconds
from simcal.cluster import QUIET_DASK, ClusterOptions, connect

log = logging.getLogger(__name__)

# The quiet Dask settings of `simcal run`'s local cluster (docs/performance.md); the
# benchmark's workers inherit them from this process.
CLUSTER_CONFIG = QUIET_DASK


@dataclass(frozen=True)
class Settings:
    """The grid and the repetitions of one run."""

    name: str
    workers: tuple[int, ...]
    durations: tuple[float, ...]
    replicates: int
    seconds: float  # asking time of one throughput run (at least 6 trials' worth of sleep)
    raw_seconds: float
    gather_sizes: tuple[int, ...]
    gather_repeats: int
    optimizer_sizes: tuple[int, ...]
    optimizer_asks: int

    def run_seconds(self, workload: Workload) -> float:
        """Long enough for about ten batches even when replicates are slow."""
        return max(self.seconds, 6 * workload.replicates * workload.duration)


PRESETS = {
    "quick": Settings(
        name="quick",
        workers=(2,),
        durations=(0.05,),
        replicates=2,
        seconds=1.5,
        raw_seconds=1.0,
        gather_sizes=(50,),
        gather_repeats=2,
        optimizer_sizes=(10, 30),
        optimizer_asks=3,
    ),
    "default": Settings(
        name="default",
        workers=(8,),
        durations=(0.05, 0.2),
        replicates=5,
        seconds=6.0,
        raw_seconds=5.0,
        gather_sizes=(100, 1000),
        gather_repeats=3,
        optimizer_sizes=(100, 1000, 5000),
        optimizer_asks=20,
    ),
    "full": Settings(
        name="full",
        workers=(8, 16, 32),
        durations=(0.05, 0.2, 1.0),
        replicates=5,
        seconds=12.0,
        raw_seconds=10.0,
        gather_sizes=(100, 1000, 5000),
        gather_repeats=3,
        optimizer_sizes=(100, 1000, 5000),
        optimizer_asks=30,
    ),
}


def _meta(settings: Settings, storage: str) -> dict[str, Any]:
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["simcal", *sys.argv[1:]]),
        "settings": asdict(settings),
        "storage": storage,
        "cpus": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "versions": {
            package: version(package) for package in ("simcal", "dask", "distributed", "optuna")
        }
        | {"python": platform.python_version()},
        "aggregation_seconds": aggregation_seconds(settings.replicates),
        "dask_config": CLUSTER_CONFIG,
    }


def _on_cluster(settings: Settings, workers: int, storage: str, results: dict) -> None:
    started = time.perf_counter()
    options = ClusterOptions(workers=workers, dashboard_address=None, connect_timeout=300)
    with dask.config.set(CLUSTER_CONFIG), connect(options) as client:
        log.info("cluster of %d workers up in %.1fs", workers, time.perf_counter() - started)
        if workers == settings.workers[0]:
            for n in settings.gather_sizes:
                results["gather"] += gather_costs(client, n, settings.gather_repeats)
        for duration in settings.durations:
            workload = Workload(workers, duration, settings.replicates)
            results["raw_dask"].append(raw_task_rate(client, workload, settings.raw_seconds))
            for mode in mode_names():
                results["throughput"].append(
                    calibration_throughput(
                        client, workload, mode, settings.run_seconds(workload), storage
                    )
                )
            if duration == min(settings.durations, key=lambda d: abs(d - 0.2)):
                seconds = max(settings.run_seconds(workload), 2 * settings.seconds)
                results["report_cost"].append(live_report_cost(client, workload, seconds))


def run_suite(settings: Settings, storage: str = "memory") -> dict[str, Any]:
    """Every measurement of ``settings``, in one process; returns the results document."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": _meta(settings, storage),
        "optimizer_cost": [],
        "gather": [],
        "raw_dask": [],
        "throughput": [],
        "report_cost": [],
    }
    for optimizer_storage in STORAGES:
        results["optimizer_cost"] += ask_tell_cost(
            optimizer_storage, list(settings.optimizer_sizes), settings.optimizer_asks
        )
    for workers in settings.workers:
        _on_cluster(settings, workers, storage, results)
    results["meta"]["load_average_end"] = os.getloadavg()
    results["meta"]["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    results["targets"] = check_targets(results)
    return results
