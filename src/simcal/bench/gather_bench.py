"""Gather microbenchmark: what each strategy costs per future on futures already finished.

N tasks, one in ten failing, all finished before timing starts: what is measured is the
gather itself (round trips, transfers, exception handling), not the tasks.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from typing import Any

from distributed import Client, wait

from simcal.bench.strategies import SIMCAL, all_strategies
from simcal.service import SimulationService

log = logging.getLogger(__name__)

FAIL_EVERY = 10
TIMEOUT = 120.0


class InjectedError(RuntimeError):
    """The failure one task in ten raises."""


def numbered_task(index: int) -> int:
    """Return ``index``; raise for every ``FAIL_EVERY``-th one."""
    if index % FAIL_EVERY == 0:
        raise InjectedError(f"task {index} fails on purpose")
    return index


def quiet_task_errors() -> None:
    """Run on workers: the failures here are on purpose, so no ERROR log line for each."""
    logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)


def _check(name: str, results: list[object | BaseException], n: int) -> None:
    failed = sum(isinstance(result, BaseException) for result in results)
    expected = (n + FAIL_EVERY - 1) // FAIL_EVERY
    if len(results) != n or failed != expected:
        raise RuntimeError(f"{name} returned {len(results)} results, {failed} failed")


def gather_costs(client: Client, n: int, repeats: int) -> list[dict[str, Any]]:
    """One row per strategy: median microseconds per future over ``repeats`` gathers."""
    service = SimulationService(client)
    strategies = all_strategies(service)
    client.run(quiet_task_errors)
    prefix = f"gather-bench-{uuid.uuid4().hex[:8]}"
    futures = client.map(numbered_task, range(n), key=[f"{prefix}-{i}" for i in range(n)])
    wait(futures)
    samples: dict[str, list[float]] = {name: [] for name in strategies}
    try:
        for _ in range(repeats):  # interleaved, so load changes hit every strategy alike
            for name, gather in strategies.items():
                start = time.perf_counter()
                results = gather(futures, TIMEOUT)
                samples[name].append(time.perf_counter() - start)
                _check(name, results, n)
    finally:
        client.cancel(futures)
    simcal = statistics.median(samples[SIMCAL])
    rows = [
        {
            "n": n,
            "strategy": name,
            "repeats": repeats,
            "us_per_future": statistics.median(seconds) / n * 1e6,
            "ratio_to_simcal": statistics.median(seconds) / simcal,
            "seconds": [round(value, 6) for value in seconds],
        }
        for name, seconds in samples.items()
    ]
    for row in rows:
        log.info(
            "gather N=%-5d %-20s %9.1f us/future  %6.1fx simcal",
            n,
            row["strategy"],
            row["us_per_future"],
            row["ratio_to_simcal"],
        )
    return rows
