"""Metrics: the Prometheus registry of one calibration driver and every metric in it.

One object, passed into the driver; nothing here is a module-level global.
"""

from __future__ import annotations

import platform
import time
from collections import deque
from collections.abc import Callable
from importlib.metadata import version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)

from simcal.failures import FailureReason

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STORAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
STORAGE_OPERATIONS = ("ask", "tell", "other")


class TrailingWindow:
    """Sum of values recorded over the last ``seconds`` (for rates and utilization)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._started = clock()
        self._events: deque[tuple[float, float]] = deque()
        self._total = 0.0

    def add(self, value: float = 1.0) -> None:
        self._events.append((self._clock(), value))
        self._total += value

    def span(self) -> float:
        """The window's length so far: ``seconds``, or less early in the run."""
        return max(min(self.seconds, self._clock() - self._started), 1e-9)

    def total(self) -> float:
        cutoff = self._clock() - self.seconds
        while self._events and self._events[0][0] < cutoff:
            self._total -= self._events.popleft()[1]
        return max(self._total, 0.0)


class Metrics:
    """The driver's metrics for one study, in their own registry."""

    def __init__(
        self,
        study: str,
        *,
        registry: CollectorRegistry | None = None,
        window_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.study = study
        self.registry = registry or CollectorRegistry()
        self._completed_window = TrailingWindow(window_seconds, clock)
        self._occupancy = TrailingWindow(window_seconds, clock)
        self._occupancy_samples = TrailingWindow(window_seconds, clock)
        labels = ["study"]
        self.trials = Counter(
            "simcal_trials",
            "Trials told to the optimizer.",
            [*labels, "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "simcal_trial_errors",
            "Failed trials by reason.",
            [*labels, "reason"],
            registry=self.registry,
        )
        self.trials_per_minute = Gauge(
            "simcal_trials_per_minute",
            "Completed (or pruned) trials per minute over a trailing window.",
            labels,
            registry=self.registry,
        )
        self.duration = Histogram(
            "simcal_trial_duration_seconds",
            "Seconds from a trial's submission to its tell.",
            labels,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "simcal_inflight_trials",
            "Trials submitted and not yet told.",
            labels,
            registry=self.registry,
        )
        self.workers = Gauge(
            "simcal_workers", "Connected Dask workers.", labels, registry=self.registry
        )
        self.min_workers = Gauge(
            "simcal_min_workers",
            "Workers the calibration needs (configured minimum).",
            labels,
            registry=self.registry,
        )
        self.utilization = Gauge(
            "simcal_worker_utilization_ratio",
            "Busy task-seconds / (worker threads x wall seconds) over a trailing window "
            "(sampled from the workers' heartbeats).",
            labels,
            registry=self.registry,
        )
        self.best_loss = Gauge(
            "simcal_best_loss", "Best loss found so far.", labels, registry=self.registry
        )
        self._build = Info(  # exported as simcal_build_info{...} 1
            "simcal_build",
            "Versions of simcal and its engine, and whether the run takes the fast storage and "
            "sampler paths (value 1).",
            registry=self.registry,
        )
        self._build_labels = {
            "version": version("simcal"),
            "python": platform.python_version(),
            "dask": version("dask"),
            "distributed": version("distributed"),
            "optuna": version("optuna"),
        }
        self._build.info(self._build_labels)
        for status in ("completed", "failed", "pruned"):
            self.trials.labels(study, status)
        for reason in FailureReason:
            self.errors.labels(study, reason.value)
        self.best_loss.labels(study).set(float("nan"))
        # trailing-window gauges: computed when scraped, from the windows the driver feeds
        self.trials_per_minute.labels(study).set_function(self._trials_per_minute)
        self.utilization.labels(study).set_function(self._utilization)
        self._init_driver_metrics(window_seconds, clock)

    # -- the driver as a bottleneck (busy share, storage time) ----------------------------------

    def _init_driver_metrics(self, window_seconds: float, clock: Callable[[], float]) -> None:
        self._waited = TrailingWindow(window_seconds, clock)
        self.driver_busy = Gauge(
            "simcal_driver_busy_ratio",
            "Share of wall time the driver loop works (asks, tells, submits, bookkeeping) "
            "rather than waits for results, over a trailing window (computed when scraped).",
            ["study"],
            registry=self.registry,
        )
        self.driver_busy.labels(self.study).set_function(self.driver_busy_ratio)
        self.storage_seconds = Histogram(
            "simcal_storage_seconds",
            "Seconds per storage operation of the driver (ask; tell: one group commit per batch of "
            "results; other).",
            ["study", "operation"],
            buckets=STORAGE_BUCKETS,
            registry=self.registry,
        )
        for operation in STORAGE_OPERATIONS:
            self.storage_seconds.labels(self.study, operation)

    def driver_waited(self, seconds: float) -> None:
        """The loop spent ``seconds`` waiting for results (or for other drivers)."""
        self._waited.add(max(seconds, 0.0))

    def driver_busy_ratio(self) -> float:
        """1 - waiting / wall over the trailing window (1.0: the loop never waits)."""
        return min(max(1.0 - self._waited.total() / self._waited.span(), 0.0), 1.0)

    def storage_time(self, operation: str, seconds: float) -> None:
        """One storage operation's duration; ``operation`` is ask, tell or other."""
        self.storage_seconds.labels(self.study, operation).observe(seconds)

    def trial_completed(self, loss: float, seconds: float) -> None:
        self.trials.labels(self.study, "completed").inc()
        self.duration.labels(self.study).observe(seconds)
        self._completed_window.add()

    def trial_pruned(self, seconds: float) -> None:
        """A trial stopped after its first replicates: finished work, not an error."""
        self.trials.labels(self.study, "pruned").inc()
        self.duration.labels(self.study).observe(seconds)
        self._completed_window.add()

    def trial_failed(self, reason: FailureReason, seconds: float) -> None:
        self.trials.labels(self.study, "failed").inc()
        self.errors.labels(self.study, reason.value).inc()
        self.duration.labels(self.study).observe(seconds)

    def set_best_loss(self, loss: float) -> None:
        """The best loss so far (the driver tracks it and says when it improves)."""
        self.best_loss.labels(self.study).set(loss)

    def set_inflight(self, trials: int) -> None:
        self.inflight.labels(self.study).set(trials)

    def observe_cluster(self, workers: int, threads: int, busy_threads: int) -> None:
        """Record the worker count and one sample of the share of threads running a task."""
        self.workers.labels(self.study).set(workers)
        if threads:
            self._occupancy.add(busy_threads / threads)
            self._occupancy_samples.add()

    def set_fast_path(self, storage: bool, sampler: bool) -> None:
        """Which path the run takes, as ``simcal_build_info`` labels: ``fast_path`` (both
        fast), ``fast_path_storage``, ``fast_path_sampler`` ("true"/"false")."""
        flags = {"fast_path": storage and sampler, "fast_path_storage": storage}
        flags["fast_path_sampler"] = sampler
        self._build.info({**self._build_labels, **{k: str(v).lower() for k, v in flags.items()}})

    def set_min_workers(self, workers: int) -> None:
        self.min_workers.labels(self.study).set(workers)

    def _trials_per_minute(self) -> float:
        return self._completed_window.total() * 60 / self._completed_window.span()

    def _utilization(self) -> float:
        samples = self._occupancy_samples.total()
        return self._occupancy.total() / samples if samples else 0.0

    def completed_trials(self) -> float:
        """Trials completed so far by this driver (``simcal_trials_total{status="completed"}``)."""
        sample = self.registry.get_sample_value(
            "simcal_trials_total", {"study": self.study, "status": "completed"}
        )
        return 0.0 if sample is None else sample
