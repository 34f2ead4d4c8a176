"""Storage comparison (``simcal bench --storages``): the streaming driver on the sleep workload
with each storage side by side, on one cluster, in one run.

Rows: ``memory`` (Optuna's in-memory storage), ``default`` (what ``simcal run`` uses with
neither ``--storage`` nor ``$SIMCAL_STORAGE``: the config's ``sqlite:///simcal.db``, here in a
temporary directory), ``sqlite`` (an ``sqlite:///`` URL of a temporary file) and ``postgresql``
(the URL given with ``--postgres-url``). Storages alternate within each round, so load on a
shared machine hits them alike; the efficiency is the median over rounds.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
from typing import Any

import dask

from simcal.bench.markdown import markdown_table
from simcal.bench.throughput import calibration_throughput
from simcal.bench.workload import Workload
from simcal.cluster import ClusterOptions, connect
from simcal.config import CalibrationConfig

log = logging.getLogger(__name__)

STORAGE_NAMES = ("memory", "default", "sqlite", "postgresql")
TARGETS = {0.05: 0.85, 0.2: 0.95}  # efficiency at W = 8, R = 5 (issue 10)


def storage_urls(names: list[str], directory: str, postgres_url: str | None) -> dict[str, str]:
    """What each named storage means as ``calibration_throughput``'s ``storage`` argument."""
    default = str(CalibrationConfig.model_fields["storage"].default)  # sqlite:///simcal.db
    urls = {
        "memory": "memory",
        "default": default.replace("sqlite:///", f"sqlite:///{directory}/default-", 1),
        "sqlite": f"sqlite:///{directory}/url.db",
    }
    chosen = {}
    for name in names:
        if name == "postgresql":
            if not postgres_url:
                raise ValueError("--storages postgresql needs --postgres-url URL")
            chosen[name] = postgres_url
        elif name in urls:
            chosen[name] = urls[name]
        else:
            raise ValueError(f"unknown storage {name!r}: choose from {', '.join(STORAGE_NAMES)}")
    return chosen


def compare_storages(
    names: list[str],
    postgres_url: str | None = None,
    *,
    workers: int = 8,
    durations: tuple[float, ...] = (0.05, 0.2),
    replicates: int = 5,
    seconds: float = 8.0,
    rounds: int = 2,
    cluster_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Streaming throughput with each storage; returns rows and their medians."""
    from simcal.bench.suite import CLUSTER_CONFIG

    rows: list[dict[str, Any]] = []
    load_start = os.getloadavg()
    options = ClusterOptions(workers=workers, dashboard_address=None, connect_timeout=300)
    with (
        tempfile.TemporaryDirectory(prefix="simcal-storages-") as directory,
        dask.config.set(cluster_config or CLUSTER_CONFIG),
        connect(options) as client,
    ):
        urls = storage_urls(names, directory, postgres_url)
        for duration in durations:
            workload = Workload(workers, duration, replicates)
            run_seconds = max(seconds, 6 * replicates * duration)
            for round_ in range(rounds):
                for name, storage in urls.items():
                    row = calibration_throughput(
                        client, workload, "streaming", run_seconds, storage
                    )
                    rows.append({**row, "storage": name, "round": round_})
    summary = []
    for duration in durations:
        for name in urls:
            mine = [r for r in rows if r["storage"] == name and r["duration"] == duration]
            efficiency = statistics.median(r["efficiency"] for r in mine)
            target = TARGETS.get(duration) if name in ("default", "sqlite") else None
            summary.append(
                {
                    "workers": workers,
                    "duration": duration,
                    "replicates": replicates,
                    "storage": name,
                    "efficiency": efficiency,
                    "efficiencies": [round(r["efficiency"], 3) for r in mine],
                    "trials_per_minute": statistics.median(r["trials_per_minute"] for r in mine),
                    "driver_cpu_ms_per_trial": 1000
                    * statistics.median(r["driver_cpu_seconds_per_trial"] for r in mine),
                    "target": target,
                    "met": None if target is None else efficiency >= target,
                }
            )
    return {
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "rows": rows,
        "summary": summary,
    }


def storages_markdown(result: dict[str, Any]) -> str:
    """The comparison as a markdown table, with the load averages around it."""
    start = " ".join(f"{x:.2f}" for x in result["load_average_start"])
    end = " ".join(f"{x:.2f}" for x in result["load_average_end"])
    table = markdown_table(
        result["summary"],
        [
            ("W", lambda r: r["workers"]),
            ("d (s)", lambda r: r["duration"]),
            ("R", lambda r: r["replicates"]),
            ("storage", lambda r: r["storage"]),
            ("efficiency (median)", lambda r: round(r["efficiency"], 3)),
            ("rounds", lambda r: ", ".join(f"{e:.3f}" for e in r["efficiencies"])),
            ("trials/min", lambda r: round(r["trials_per_minute"])),
            ("driver CPU ms/trial", lambda r: round(r["driver_cpu_ms_per_trial"], 1)),
            ("target", lambda r: r["target"]),
            ("met", lambda r: r["met"]),
        ],
    )
    return f"# simcal bench --storages\n\nload average {start} -> {end}\n\n{table}\n"
