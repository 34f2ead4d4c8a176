"""The driver as a bottleneck: ``simcal_driver_busy_ratio`` and ``simcal_storage_seconds``."""

from __future__ import annotations

from pathlib import Path

from distributed import Client
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metric_samples import sample
from simcal.metrics import Metrics
from test_driver import calibrate
from test_metrics import FakeClock


def _families(metrics: Metrics) -> dict[str, object]:
    text = generate_latest(metrics.registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_busy_ratio_is_computed_when_scraped_over_a_trailing_window() -> None:
    clock = FakeClock()
    metrics = Metrics("demo", clock=clock, window_seconds=60)
    for _ in range(60):  # a minute: 0.25 s of work, 0.75 s of waiting per second
        clock.now += 1
        metrics.driver_waited(0.75)
    [sample] = _families(metrics)["simcal_driver_busy_ratio"].samples
    assert sample.labels == {"study": "demo"} and abs(sample.value - 0.25) < 0.02
    for _ in range(60):  # then a saturated minute: the loop never waits
        clock.now += 1
        metrics.driver_waited(0.0)
    [sample] = _families(metrics)["simcal_driver_busy_ratio"].samples  # no refresh() needed
    assert sample.value > 0.98  # the event on the window's edge may still count


def test_storage_seconds_is_a_histogram_per_operation() -> None:
    metrics = Metrics("demo")
    metrics.storage_time("ask", 0.02)
    metrics.storage_time("tell", 0.004)
    family = _families(metrics)["simcal_storage_seconds"]
    assert family.type == "histogram"
    counts = {
        s.labels["operation"]: s.value for s in family.samples if s.name.endswith("_count")
    }
    assert counts == {"ask": 1.0, "tell": 1.0, "other": 0.0}
    assert all(set(s.labels) - {"le"} == {"study", "operation"} for s in family.samples)


def test_a_real_run_reports_its_storage_time_and_busy_share(
    client: Client, tmp_path: Path
) -> None:
    _, metrics, stats = calibrate(client, tmp_path, max_trials=12, model_options={"duration": 0.2})
    asks = sample(metrics, "simcal_storage_seconds_count", operation="ask")
    tells = sample(metrics, "simcal_storage_seconds_count", operation="tell")
    assert asks == stats.completed + stats.failed == 12
    assert 1 <= tells <= 12  # one group commit per batch of results
    assert sample(metrics, "simcal_storage_seconds_count", operation="other") >= 12  # tallies
    assert sample(metrics, "simcal_storage_seconds_sum", operation="ask") > 0
    busy = metrics.driver_busy_ratio()
    assert 0.0 < busy < 0.9, busy  # 0.2 s replicates: the loop mostly waits
