"""Raw Dask baseline: simcal's replicate tasks through ``client.map``, no optimizer.

The task rate simcal's streaming driver should approach on the same cluster.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from distributed import Client, as_completed

from simcal.bench.workload import PARAMS, Workload, steady_rate
from simcal.models.synthetic import simulate
from simcal.tasks import run_replicate

log = logging.getLogger(__name__)


def raw_task_rate(client: Client, workload: Workload, seconds: float) -> dict[str, Any]:
    """Submit about ``seconds`` worth of replicate tasks at once; measure their rate."""
    n = max(int(workload.ideal_tasks_per_second() * seconds), 4 * workload.workers)
    options = workload.model_options()
    start = time.perf_counter()
    futures = client.map(
        run_replicate, [simulate] * n, [PARAMS] * n, range(n), [options] * n, pure=False
    )
    times = [time.perf_counter() for _ in as_completed(futures)]
    client.gather(futures)
    elapsed = time.perf_counter() - start
    rate = steady_rate(times)
    row = {
        "workers": workload.workers,
        "duration": workload.duration,
        "tasks": n,
        "elapsed_seconds": round(elapsed, 3),
        "tasks_per_second": rate,
        "end_to_end_tasks_per_second": n / elapsed,
        "ideal_tasks_per_second": workload.ideal_tasks_per_second(),
    }
    log.info(
        "raw dask   %s %7.1f tasks/s (ideal %.1f)",
        workload.label,
        rate,
        row["ideal_tasks_per_second"],
    )
    return row
