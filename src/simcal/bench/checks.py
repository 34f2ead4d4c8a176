"""The performance targets of issue 5, checked against the results of one run.

A target whose grid point the run did not measure is reported as not measured
(``met`` is ``None``), never as met.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

Results = dict[str, Any]
BATCH_SEQUENTIAL_MAX_RATIO = 0.95  # "measurably below": at least 5% fewer trials/min
COMPARE = {">=": operator.ge, "<=": operator.le}


def _throughput(results: Results, workers: int, duration: float, mode: str) -> dict | None:
    for row in results.get("throughput", []):
        if (row["workers"], row["duration"], row["mode"]) == (workers, duration, mode):
            return row
    return None


def _efficiency(workers: int, duration: float) -> Callable[[Results], float | None]:
    def value(results: Results) -> float | None:
        row = _throughput(results, workers, duration, "streaming")
        return row["efficiency"] if row else None

    return value


def _gather_speedup(results: Results) -> float | None:
    rows = {r["strategy"]: r for r in results.get("gather", []) if r["n"] == 1000}
    if "wait_then_result" not in rows or "simcal" not in rows:
        return None
    return rows["wait_then_result"]["us_per_future"] / rows["simcal"]["us_per_future"]


def _raw_dask_ratio(results: Results) -> float | None:
    streaming = _throughput(results, 8, 0.05, "streaming")
    raw = [r for r in results.get("raw_dask", []) if (r["workers"], r["duration"]) == (8, 0.05)]
    if not streaming or not raw:
        return None
    return streaming["replicate_tasks_per_second"] / raw[0]["tasks_per_second"]


def _worst_batch_sequential_ratio(results: Results) -> float | None:
    ratios = []
    for row in results.get("throughput", []):
        if row["mode"] != "batch/sequential":
            continue
        streaming = _throughput(results, row["workers"], row["duration"], "streaming")
        if streaming:
            ratios.append(row["trials_per_minute"] / streaming["trials_per_minute"])
    return max(ratios) if ratios else None


def _report_share(results: Results) -> float | None:
    rows = [r for r in results.get("report_cost", []) if (r["workers"], r["duration"]) == (8, 0.2)]
    return rows[0]["cpu_share_at_default_interval"] if rows else None


TARGETS: list[tuple[str, str, float, Callable[[Results], float | None]]] = [
    # (name, comparison, threshold, value)
    ("streaming efficiency, W=8 d=0.2s", ">=", 0.95, _efficiency(8, 0.2)),
    ("streaming efficiency, W=32 d=0.2s", ">=", 0.90, _efficiency(32, 0.2)),
    ("streaming efficiency, W=8 d=0.05s", ">=", 0.80, _efficiency(8, 0.05)),
    ("gather N=1000: wait_then_result / simcal per future", ">=", 10.0, _gather_speedup),
    ("streaming replicate rate / raw Dask, W=8 d=0.05s", ">=", 0.90, _raw_dask_ratio),
    (
        "batch/sequential / streaming trials/min, worst grid point",
        "<=",
        BATCH_SEQUENTIAL_MAX_RATIO,
        _worst_batch_sequential_ratio,
    ),
    ("live report CPU share of driver time (30 s interval), W=8 d=0.2s", "<=", 0.02,
     _report_share),
]


def check_targets(results: Results) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it was met."""
    checked = []
    for name, comparison, threshold, measure in TARGETS:
        value = measure(results)
        met = None if value is None else COMPARE[comparison](value, threshold)
        checked.append(
            {
                "target": name,
                "comparison": comparison,
                "threshold": threshold,
                "value": value,
                "met": met,
            }
        )
    return checked
