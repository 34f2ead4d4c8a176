"""Load: 5,000 trials of a fast synthetic model on 8 workers, memory flat, no futures leaked.

The driver (``simcal run``) runs in a subprocess against a ``dask scheduler`` and 8 worker
processes; the test samples the driver's RSS with psutil, its progress from ``/metrics``, and
the scheduler's simcal tasks while it runs. The sampler is ``random``: TPE's cost per trial
grows with the number of trials, which is a performance question, not a reliability one.
The SQLite file lives in /dev/shm when there is one: fsync cost is not under test here.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from distributed import Client

from conftest import write_config
from processes import (
    HOST,
    assert_no_loss,
    free_port,
    simcal_run,
    start_scheduler,
    start_workers,
    stopping,
    stored_trials,
)
from simcal.driver import auto_in_flight

TRIALS, WORKERS, REPLICATES = 5_000, 8, 2
MB = 2**20


def _scheduler_simcal_tasks(client: Client) -> list[str]:
    return client.run_on_scheduler(
        lambda dask_scheduler: [
            str(k) for k in dask_scheduler.tasks if str(k).startswith(("sim-", "agg-"))
        ]
    )


def _told(metrics_url: str) -> int | None:
    """``simcal_trials_total`` summed over statuses, or None while /metrics is not up."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("simcal_trials_total{")
        )
    )


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_5000_trials_memory_flat_and_no_futures_leak() -> None:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="simcal-load-", dir=base) as directory:
        _run_load(Path(directory))


def _run_load(tmp: Path) -> None:
    study = "load"
    config = write_config(
        tmp, study=study, model_options={"duration": 0.0}, replicates=REPLICATES,
        max_trials=TRIALS, sampler="random",
    )
    storage, summary = f"sqlite:///{tmp / 'simcal.db'}", tmp / "summary.json"
    port = free_port()
    metrics_url = f"http://{HOST}:{port}/metrics"
    samples: list[tuple[float, int, int]] = []  # (seconds, trials told, driver RSS)
    tasks_seen: list[int] = []
    scheduler, address = start_scheduler(tmp)
    with stopping(scheduler) as procs, Client(address, timeout=60) as client:
        procs.append(start_workers(address, tmp, nworkers=WORKERS))
        client.wait_for_workers(WORKERS, timeout=300)
        started = time.monotonic()
        driver = simcal_run(
            config, tmp, "--scheduler", address, "--metrics-port", str(port),
            "--metrics-host", HOST, "--metrics-linger", "15", "--summary", str(summary),
        )
        procs.append(driver)
        process = psutil.Process(driver.pid)
        while driver.alive() and not summary.exists():
            told = _told(metrics_url)
            if told is not None:
                samples.append((time.monotonic() - started, told, process.memory_info().rss))
                if len(samples) % 5 == 0:
                    tasks_seen.append(len(_scheduler_simcal_tasks(client)))
            time.sleep(1.0)
        assert driver.says("metrics and live report on"), driver.output()[-4000:]
        time.sleep(1.0)  # the summary is written: the run is over, /metrics lingers
        told, rss_end = _told(metrics_url), process.memory_info().rss
        elapsed = time.monotonic() - started
        assert driver.wait(120) == 0, driver.output()[-4000:]
        leftover = _scheduler_simcal_tasks(client)

    assert told == TRIALS
    assert_no_loss(stored_trials(storage, study), TRIALS)
    assert json.loads(summary.read_text())["n_trials"] == TRIALS
    at_1000 = next(rss for _, count, rss in samples if count >= 1000)
    peak = max(rss for *_, rss in samples)
    figures = (
        f"driver RSS {at_1000 / MB:.0f} MB at 1,000 trials, {rss_end / MB:.0f} MB at {TRIALS:,}"
        f" (peak {peak / MB:.0f} MB); {TRIALS:,} trials in {elapsed:.0f}s"
        f" ({TRIALS / elapsed * 60:.0f}/min); scheduler simcal tasks during the run at most"
        f" {max(tasks_seen, default=0)}"
    )
    print(figures)  # shown with -s or -rP
    assert rss_end < 1.25 * at_1000 + 20 * MB, figures  # flat: no per-trial state kept
    # at most the trials in flight hold tasks: no finished trial's futures are kept
    in_flight_tasks = auto_in_flight(WORKERS, REPLICATES) * (REPLICATES + 1)
    assert max(tasks_seen) <= 2 * in_flight_tasks, figures
    assert not leftover, f"the scheduler still holds simcal tasks: {leftover[:10]}"
