"""The driver's Prometheus metrics: names, types and labels as the design fixes them."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from metric_samples import sample
from simcal.failures import FailureReason
from simcal.metrics import Metrics, TrailingWindow
from simcal.webapp import HTTPServer, make_app

DESIGN = {  # name -> (type, labels besides the histogram's own)
    "simcal_trials": ("counter", {"study", "status"}),
    "simcal_trial_errors": ("counter", {"study", "reason"}),
    "simcal_trials_per_minute": ("gauge", {"study"}),
    "simcal_trial_duration_seconds": ("histogram", {"study"}),
    "simcal_inflight_trials": ("gauge", {"study"}),
    "simcal_workers": ("gauge", {"study"}),
    "simcal_min_workers": ("gauge", {"study"}),
    "simcal_worker_utilization_ratio": ("gauge", {"study"}),
    "simcal_best_loss": ("gauge", {"study"}),
    "simcal_driver_busy_ratio": ("gauge", {"study"}),
    "simcal_storage_seconds": ("histogram", {"study", "operation"}),
    "simcal_build_info": (
        "gauge",
        {"version", "python", "dask", "distributed", "optuna"}
        | {"fast_path", "fast_path_storage", "fast_path_sampler"},  # which path the run takes
    ),
}


class FakeClock:
    """A clock the test advances by hand (time itself is not under test)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scrape(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_served_metrics_match_the_design() -> None:
    metrics = Metrics("demo")
    server = HTTPServer(make_app(metrics.registry, "demo", None), 0, "127.0.0.1")  # as the driver
    port = server.port
    try:
        metrics.set_best_loss(2.5)
        metrics.set_fast_path(storage=True, sampler=False)
        metrics.trial_completed(loss=2.5, seconds=1.2)
        metrics.trial_failed(FailureReason.NAN_LOSS, seconds=0.5)
        metrics.trial_pruned(seconds=0.3)
        families = scrape(port)
    finally:
        server.close()
    for name, (kind, labels) in DESIGN.items():
        assert name in families, f"{name} missing"
        family = families[name]
        assert family.type == kind, name
        for item in family.samples:
            assert set(item.labels) - {"le"} == labels, item
    counts = {
        (s.labels["status"]): s.value
        for s in families["simcal_trials"].samples
        if s.name == "simcal_trials_total"
    }
    assert counts == {"completed": 1.0, "failed": 1.0, "pruned": 1.0}
    reasons = {
        s.labels["reason"]: s.value
        for s in families["simcal_trial_errors"].samples
        if s.name == "simcal_trial_errors_total"
    }
    assert reasons == {
        reason.value: float(reason is FailureReason.NAN_LOSS) for reason in FailureReason
    }
    [best] = families["simcal_best_loss"].samples
    assert best.value == 2.5
    [build] = families["simcal_build_info"].samples
    assert (build.labels["fast_path"], build.labels["fast_path_storage"]) == ("false", "true")
    assert build.labels["fast_path_sampler"] == "false"


def test_trailing_rates_and_utilization() -> None:
    clock = FakeClock()
    metrics = Metrics("demo", window_seconds=60, clock=clock)
    for _ in range(30):  # 30 trials over 30 s, all 4 threads busy
        clock.now += 1
        metrics.observe_cluster(workers=4, threads=4, busy_threads=4)
        metrics.trial_completed(loss=1.0, seconds=1.0)
    assert sample(metrics, "simcal_trials_per_minute") == 60.0  # computed when read
    assert sample(metrics, "simcal_worker_utilization_ratio") == 1.0
    assert sample(metrics, "simcal_workers") == 4
    clock.now += 0.5
    for _ in range(45):  # then 45 s with one thread busy and no trial finishing
        clock.now += 1
        metrics.observe_cluster(workers=4, threads=4, busy_threads=1)
    # the window now holds the last 15 busy seconds and 45 idle ones
    assert sample(metrics, "simcal_trials_per_minute") == 15.0
    assert sample(metrics, "simcal_worker_utilization_ratio") == (15 * 1.0 + 45 * 0.25) / 60


def test_best_loss_is_what_the_driver_sets() -> None:
    metrics = Metrics("demo")
    metrics.set_best_loss(3.0)
    metrics.trial_completed(loss=1.0, seconds=1)  # the driver, not the metrics, tracks the best
    assert sample(metrics, "simcal_best_loss") == 3.0


def test_trailing_window_drops_old_events() -> None:
    clock = FakeClock()
    window = TrailingWindow(10, clock)
    window.add(2.0)
    clock.now += 5
    window.add(3.0)
    assert window.total() == 5.0
    clock.now += 6
    assert window.total() == 3.0
    assert window.span() == 10


def test_completed_trials_counts_only_completed_ones() -> None:
    """What the live report refreshes on (simcal.reporting.live.DriverHTTP)."""
    metrics = Metrics("demo")
    assert metrics.completed_trials() == 0
    metrics.trial_completed(loss=1.0, seconds=0.1)
    metrics.trial_failed(FailureReason.NAN_LOSS, seconds=0.1)
    metrics.trial_pruned(seconds=0.1)
    metrics.trial_completed(loss=0.5, seconds=0.1)
    assert metrics.completed_trials() == 2
