"""The live report's cost to the driver: one streaming run on SQLite with the report asked for
all the time (so regenerated every ``every`` seconds, the worst case), one without, back to
back on the same cluster; generation time as a share of the driver's wall time."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from typing import Any

from distributed import Client
from optuna.trial import TrialState

from simcal.bench.throughput import _Silent
from simcal.bench.workload import Workload, steady_rate
from simcal.driver import Calibration
from simcal.metrics import Metrics
from simcal.reporting.live import DEFAULT_INTERVAL, LiveReport
from simcal.samplers import make_sampler
from simcal.service import SimulationService
from simcal.storage import open_study

log = logging.getLogger(__name__)

BENCH_INTERVAL = 2.0  # much more often than the default 30 s, to measure many generations


def _run(
    client: Client, workload: Workload, seconds: float, directory: str, live: bool
) -> dict[str, Any]:
    name = "with-report" if live else "without-report"
    config = workload.config(mode="streaming", seconds=seconds).model_copy(
        update={"storage": f"sqlite:///{directory}/{name}.db", "study": f"report-cost-{name}"}
    )
    study = open_study(config.storage, config.study, make_sampler(config.sampler, config.seed))
    report = LiveReport(config, interval=BENCH_INTERVAL) if live else None
    stop = threading.Event()

    def ask_for_report() -> None:  # a browser that never stops reloading /report
        while report is not None and not stop.wait(0.25):
            report.request()

    poller = threading.Thread(target=ask_for_report, daemon=True)
    poller.start()
    calibration = Calibration(
        config, SimulationService(client), study, Metrics(config.study), progress=_Silent()
    )
    cpu, wall = time.process_time(), time.perf_counter()
    stats = calibration.run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    stop.set()
    poller.join()
    if report is not None:
        report.close(finish=True)  # a report being drawn finishes, so it is counted
    generations, report_seconds, report_cpu = (
        (report.generations, report.seconds, report.cpu_seconds) if report else (0, 0.0, 0.0)
    )
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rate = steady_rate([t.datetime_complete.timestamp() for t in completed]) * 60
    return {
        "completed": stats.completed,
        "wall": wall,
        "cpu": cpu,
        "rate": rate,
        "generations": generations,
        "report_seconds": report_seconds,
        "report_cpu": report_cpu,
    }


def live_report_cost(client: Client, workload: Workload, seconds: float) -> dict[str, Any]:
    """Measure the live report's share of driver time, and the throughput with and without."""
    with tempfile.TemporaryDirectory(prefix="simcal-bench-report-") as directory:
        without = _run(client, workload, seconds, directory, live=False)
        with_report = _run(client, workload, seconds, directory, live=True)
    reports = max(with_report["generations"], 1)
    per_report = with_report["report_seconds"] / reports
    cpu_per_report = with_report["report_cpu"] / reports
    row = {
        "workers": workload.workers,
        "duration": workload.duration,
        "replicates": workload.replicates,
        "elapsed_seconds": round(with_report["wall"], 3),
        "reports": with_report["generations"],
        "seconds_per_report": per_report,
        "share_at_bench_interval": with_report["report_seconds"] / with_report["wall"],
        "bench_interval_seconds": BENCH_INTERVAL,
        "share_at_default_interval": per_report / DEFAULT_INTERVAL,
        "cpu_seconds_per_report": cpu_per_report,
        "cpu_share_at_bench_interval": with_report["report_cpu"] / with_report["wall"],
        "cpu_share_at_default_interval": cpu_per_report / DEFAULT_INTERVAL,
        "default_interval_seconds": DEFAULT_INTERVAL,
        "trials_per_minute_with_report": with_report["rate"],
        "trials_per_minute_without_report": without["rate"],
        "throughput_ratio": with_report["rate"] / without["rate"] if without["rate"] else None,
        "driver_cpu_ms_per_trial_with_report": 1000 * with_report["cpu"]
        / max(with_report["completed"], 1),
        "driver_cpu_ms_per_trial_without_report": 1000 * without["cpu"]
        / max(without["completed"], 1),
    }
    log.info(
        "live report %s: %.2f s (%.2f CPU s) per report; %.1f%% of driver time every %gs, "
        "%.2f%% (CPU %.2f%%) at the default %gs; throughput with/without %.3f",
        workload.label,
        per_report,
        cpu_per_report,
        100 * row["share_at_bench_interval"],
        BENCH_INTERVAL,
        100 * row["share_at_default_interval"],
        100 * row["cpu_share_at_default_interval"],
        DEFAULT_INTERVAL,
        row["throughput_ratio"] or 0,
    )
    return row
