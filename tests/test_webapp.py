"""The driver's HTTP server: index, metrics, the live report, and nothing else."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution

from simcal.config import demo_config
from simcal.metrics import Metrics
from simcal.models.seir import simulate
from simcal.reporting.live import DriverHTTP
from simcal.tasks import FIT_ATTR_PREFIX, summarize_replicates


def seir_study(directory: Path, trials: int = 6) -> str:
    """A small stored SEIR study as the driver leaves it (losses, replicate summaries)."""
    storage = f"sqlite:///{directory / 'live.db'}"
    study = optuna.create_study(study_name="seir-demo", storage=storage)
    observed = demo_config().targets[0]
    assert observed.name == "incidence"
    distributions = {"beta": FloatDistribution(0.1, 1.0), "gamma": FloatDistribution(0.05, 0.5)}
    for number in range(trials):
        params = {"beta": 0.3 + 0.04 * number, "gamma": 0.15}
        runs = [simulate(params, seed)["incidence"] for seed in range(3)]
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, value=1000.0 * (number + 1),
            user_attrs={f"{FIT_ATTR_PREFIX}incidence": summarize_replicates(runs),
                        "loss_incidence": 1000.0 * (number + 1)},
        ))
    return storage


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A GET with the path sent exactly as written (no client-side normalisation)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture
def server(tmp_path: Path) -> DriverHTTP:
    config = demo_config({"storage": seir_study(tmp_path)})
    running = DriverHTTP(Metrics(config.study), config, 0, "127.0.0.1", interval=30)
    yield running
    running.close()


def wait_for_report(port: int) -> bytes:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, _, body = get(port, "/report/")
        if status == 200:
            return body
        assert status == 503 and b"being generated" in body
        time.sleep(0.2)
    raise AssertionError("the live report never appeared")


def test_index_links_report_and_metrics(server: DriverHTTP) -> None:
    status, headers, body = get(server.port, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"href='report/'" in body and b"href='metrics'" in body
    status, _, body = get(server.port, "/metrics")
    assert status == 200 and b"simcal_trials_total" in body
    status, headers, _ = get(server.port, "/report")
    assert status == 301 and headers["Location"] == "report/"


def test_live_report_is_generated_in_the_background_at_most_every_interval(
    server: DriverHTTP,
) -> None:
    page = wait_for_report(server.port)
    assert b"Calibration report: seir-demo" in page and b"data:image/png;base64," in page
    status, headers, png = get(server.port, "/report/fit-incidence.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert png.startswith(b"\x89PNG")
    for _ in range(3):  # within the interval: served from the folder, not regenerated
        assert get(server.port, "/report/")[0] == 200
    time.sleep(0.5)
    assert server.live is not None and server.live.generations == 1


TRAVERSALS = [
    "/report/../metrics",
    "/report/..%2f..%2fetc%2fpasswd",
    "/report/%2e%2e/%2e%2e/etc/passwd",
    "/report/../../../../etc/passwd",
    "/report//etc/passwd",
    "/report/..",
    "/report/.",
    "/report/.hidden.html",
    "/report/outside.html",
    "/report/notes.txt",
    "/report/missing.png",
    "/etc/passwd",
    "/simcal.db",
]


def test_report_serves_only_its_own_files(server: DriverHTTP, tmp_path: Path) -> None:
    wait_for_report(server.port)
    assert server.live is not None
    folder = server.live.directory
    assert folder is not None
    (tmp_path / "secret.html").write_text("secret")
    (folder / "outside.html").symlink_to(tmp_path / "secret.html")  # a link out of the folder
    (folder / "notes.txt").write_text("not a report file")
    for path in TRAVERSALS:
        status, _, body = get(server.port, path)
        assert status == 404, path
        assert b"secret" not in body and b"root:" not in body, path
    assert get(server.port, "/report/loss.png")[0] == 200


def test_simcal_run_serves_the_live_report_while_running_and_lingering(tmp_path: Path) -> None:
    """The real driver: /report/ shows the study while it runs and after, during the linger."""
    from conftest import write_config
    from processes import free_port, simcal_run, stopping, wait_until

    config = write_config(tmp_path, max_trials=40, model_options={"duration": 0.05})
    port = free_port()
    driver = simcal_run(
        config, tmp_path, "--workers", "2", "--metrics-host", "127.0.0.1",
        "--metrics-port", str(port), "--metrics-linger", "60", "--report-interval", "1",
    )
    with stopping(driver):
        def report_page() -> bytes | None:
            assert driver.alive(), driver.output()[-3000:]
            try:
                status, _, body = get(port, "/report/")
            except OSError:
                return None
            return body if status == 200 else None

        page = wait_until(report_page, timeout=120, what="the live report")
        assert b"Calibration report: synthetic-test" in page
        wait_until(lambda: driver.says("keeping /metrics and /report up"), timeout=120,
                   what="the run to end")
        time.sleep(1.1)  # older than --report-interval: the next request regenerates it

        def final_page() -> bytes | None:
            body = report_page()
            return body if body and b"40 of 40 trials completed" in body else None

        page = wait_until(final_page, timeout=60, what="the report of the finished run")
        assert b"Fit: y" in page and b"data:image/png;base64," in page
        assert get(port, "/report/../simcal.db")[0] == 404


def test_the_first_page_with_results_is_drawn_without_a_request(tmp_path: Path) -> None:
    """As soon as the run completes its first trial, a page is drawn: nobody has to ask,
    nor wait for the interval (a long one here)."""
    from processes import wait_until

    config = demo_config({"storage": seir_study(tmp_path)})
    metrics = Metrics(config.study)
    running = DriverHTTP(metrics, config, 0, "127.0.0.1", interval=3600)
    try:
        live = running.live
        assert live is not None
        wait_until(lambda: live._renderer is not None and live._renderer.is_alive(),
                   timeout=60, what="the renderer, started with the run")
        time.sleep(1.5)  # no trial completed in this run yet, nobody asked: no page
        assert live.generations == 0 and live.directory is None
        metrics.trial_completed(1000.0, 0.5)
        wait_until(lambda: live.generations == 1, timeout=120, what="the page with results")
        assert live.directory is not None and (live.directory / "report.html").is_file()
    finally:
        running.close()
    assert not live.root.exists()


def test_a_page_being_drawn_or_failing_never_blanks_the_last(server: DriverHTTP) -> None:
    """Each page is drawn into a new folder and swapped in whole; a render that fails leaves
    the last page served."""
    page = wait_for_report(server.port)
    live = server.live
    assert live is not None
    first = live.directory
    assert first is not None
    blocker = live.root / f"page-{live._serial}"  # the next page's folder cannot be made
    blocker.write_text("not a folder")
    live.generate()
    status, _, body = get(server.port, "/report/")
    assert status == 200 and body == page and live.directory == first
    assert get(server.port, "/report/loss.png")[0] == 200
    blocker.unlink()
    live.generate()  # the next one draws a new page, in a new folder
    assert live.directory not in (None, first)
    status, _, body = get(server.port, "/report/")
    assert status == 200 and b"Calibration report: seir-demo" in body


def test_live_report_answers_under_load_during_a_real_run(tmp_path: Path) -> None:
    """Load of twice the cores: the first page comes soon after the first completed trials
    (a generous deadline, not a timing claim), and from then on /report/ always answers 200
    with a whole page, never 503 while the next one is drawn."""
    import os
    import subprocess
    import sys

    from conftest import write_config
    from processes import free_port, simcal_run, stopping, wait_until

    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(2 * (os.cpu_count() or 1))
    ]
    try:
        config = write_config(tmp_path, max_trials=60, model_options={"duration": 0.2})
        port = free_port()
        driver = simcal_run(
            config, tmp_path, "--workers", "2", "--metrics-host", "127.0.0.1",
            "--metrics-port", str(port), "--metrics-linger", "30", "--report-interval", "1",
        )
        with stopping(driver):
            def completed() -> bool:
                assert driver.alive(), driver.output()[-3000:]
                try:
                    status, _, body = get(port, "/metrics")
                except OSError:
                    return False
                line = b'simcal_trials_total{status="completed",study="synthetic-test"}'
                return status == 200 and any(
                    row.startswith(line) and float(row.split()[-1]) > 0
                    for row in body.splitlines()
                )

            wait_until(completed, timeout=300, what="the first completed trial", interval=0.2)
            seen = time.monotonic()
            statuses: list[int] = []

            def page_with_results() -> bytes | None:
                status, _, body = get(port, "/report/")
                statuses.append(status)
                return body if status == 200 and b"Best loss" in body else None

            wait_until(page_with_results, timeout=90, what="a page with results",
                       interval=0.2)
            first_page = time.monotonic() - seen
            after = []
            while not driver.says("keeping /metrics and /report up"):
                status, _, body = get(port, "/report/")
                after.append(status)
                assert status == 200 and body.rstrip().endswith(b"</html>"), status
                time.sleep(0.2)
            assert after and set(after) == {200}, (
                f"the first page with results came {first_page:.1f} s after the first "
                f"completed trial, when the run had ended; before it: {statuses}"
            )
            print(f"first page with results {first_page:.1f} s after the first completed "
                  f"trial; {len(after)} requests after it, all 200; before: {statuses}")
    finally:
        for burner in burners:
            burner.kill()
            burner.wait(timeout=30)
