"""End to end with a real Prometheus server: `simcal run` on 8 local workers, scraped every second.

Prometheus (Debian's package, installed by `make test`) loads the shipped rules file and
scrapes the driver and the local Dask scheduler. The run lasts a little over five minutes
so that the 5-minute recording rule has a full window to compare with the driver's counts.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, SIMCAL, require, write_config
from dashboard_queries import dashboard_queries, load_dashboard
from simcal.models.synthetic import fault_draw
from simcal.trials import FAIL_REASON

RULES = REPO / "helm" / "simcal" / "files" / "prometheus-rules.yaml"
RUN_SECONDS = 330
WINDOW = 300
FAULTS = {"duration": 1.0, "nan_rate": 0.10, "error_rate": 0.05, "fault_seed": 9}
NO_BASELINE_YET = "simcal:trials_per_minute:baseline3h"  # exists after a study's first hour

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class PrometheusServer:
    """A Prometheus process on 127.0.0.1 with a temporary config and data directory."""

    def __init__(self, directory: Path, targets: dict[str, int]) -> None:
        binary = shutil.which("prometheus")
        require(binary, "prometheus is not installed (make test installs Debian's package)")
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in targets.items()
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self._get("/-/ready") is not None, 60, "Prometheus to be ready")

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as reply:
            return reply.read()

    def query(self, expr: str) -> list[dict]:
        body = json.loads(self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def driver_counter(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"{name}{labels} not exported")


@pytest.fixture
def run(tmp_path: Path) -> Iterator[dict]:
    """Prometheus plus a `simcal run` of the synthetic model with injected faults."""
    driver_port, dashboard_port = free_port(), free_port()
    prometheus = PrometheusServer(
        tmp_path, {"simcal-driver": driver_port, "dask-scheduler": dashboard_port}
    )
    config = write_config(
        tmp_path,
        study="e2e",
        replicates=4,
        max_trials=100_000,
        max_time=RUN_SECONDS,
        model_options=FAULTS,
        trial_timeout=120,
    )
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [
            *SIMCAL,
            "run",
            "--config",
            str(config),
            "--workers",
            "8",
            "--metrics-port",
            str(driver_port),
            "--metrics-host",
            "127.0.0.1",
            "--dashboard-address",
            f"127.0.0.1:{dashboard_port}",
            "--metrics-linger",
            "60",
            "--summary",
            str(tmp_path / "summary.json"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        yield {
            "prometheus": prometheus,
            "driver": driver,
            "driver_port": driver_port,
            "config": config,
            "dir": tmp_path,
        }
    finally:
        driver.kill()
        driver.wait(timeout=60)
        log.close()
        prometheus.stop()


def expected_failures(study: optuna.Study) -> Counter:
    """Failures the synthetic model's seeded fault draws dictate for the stored trials."""
    reasons: Counter = Counter()
    for trial in study.get_trials(deepcopy=False):
        draw = fault_draw(trial.params, FAULTS["fault_seed"])
        if draw < FAULTS["error_rate"]:
            reasons["simulation_error"] += 1
        elif draw < FAULTS["error_rate"] + FAULTS["nan_rate"]:
            reasons["nan_loss"] += 1
    return reasons


def test_prometheus_sees_what_the_driver_counts(run: dict) -> None:
    prometheus: PrometheusServer = run["prometheus"]
    port = run["driver_port"]
    wait_until(
        lambda: (
            prometheus.query('up{job="simcal-driver"} == 1')
            and prometheus.query('up{job="dask-scheduler"} == 1')
        ),
        180,
        "both targets up",
    )
    wait_until(
        lambda: driver_counter(port, "simcal_trials_total", status="completed") > 0,
        120,
        "the first completed trial",
    )
    start_count = driver_counter(port, "simcal_trials_total", status="completed")
    time.sleep(WINDOW)
    end_count = driver_counter(port, "simcal_trials_total", status="completed")
    assert run["driver"].poll() is None, "the run ended before the 5-minute window closed"
    driver_per_minute = (end_count - start_count) * 60 / WINDOW
    recorded = prometheus.scalar('simcal:trials_per_minute:rate5m{study="e2e"}')
    assert recorded == pytest.approx(driver_per_minute, rel=0.10)
    assert driver_per_minute > 30

    for expr in dashboard_queries(load_dashboard()):
        result = prometheus.query(expr)
        if NO_BASELINE_YET in expr:
            assert result == [], "the regression threshold must not exist in a study's first hour"
        else:
            assert result, f"dashboard query returned no data: {expr}"
    assert prometheus.query('ALERTS{alertstate="firing"}') == [], "a healthy run must not page"

    wait_until(lambda: (run["dir"] / "summary.json").exists(), 300, "the run to finish")
    time.sleep(3)  # two more scrapes of the final counters (the driver lingers 60 s)
    study = optuna.load_study(
        study_name="e2e", storage=yaml.safe_load(run["config"].read_text())["storage"]
    )
    stored = Counter(
        t.user_attrs[FAIL_REASON]
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.FAIL
    )
    assert stored == expected_failures(study)
    scraped = {
        sample["metric"]["reason"]: float(sample["value"][1])
        for sample in prometheus.query('simcal_trial_errors_total{study="e2e"} > 0')
    }
    assert scraped == stored
    total = len(study.get_trials(deepcopy=False))
    assert stored["nan_loss"] / total == pytest.approx(FAULTS["nan_rate"], abs=0.04)
    assert stored["simulation_error"] / total == pytest.approx(FAULTS["error_rate"], abs=0.03)
    completed = prometheus.scalar('simcal_trials_total{study="e2e",status="completed"}')
    assert completed == sum(1 for t in study.get_trials() if t.state == TrialState.COMPLETE)
