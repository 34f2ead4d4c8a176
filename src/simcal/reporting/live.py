"""The live report of a running calibration: regenerated in a background thread, at most every
``interval`` seconds and only while someone asks for it, never in the driver loop."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path

import optuna

from simcal.config import CalibrationConfig
from simcal.metrics import Metrics
from simcal.webapp import HTTPServer, ReportSource, make_app

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30.0


class LiveReport:
    """A report folder kept fresh on demand: :meth:`request` asks, a thread regenerates."""

    def __init__(
        self, config: CalibrationConfig, *, interval: float = DEFAULT_INTERVAL, top: int = 5
    ) -> None:
        self.config = config
        self.interval = interval
        self.top = top
        self.directory = Path(tempfile.mkdtemp(prefix="simcal-report-"))
        self.generations = 0
        self.seconds = 0.0  # wall seconds spent generating
        self.cpu_seconds = 0.0  # CPU seconds of the generating thread
        self._last = -math.inf
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._study: optuna.Study | None = None
        self._cache: dict = {}  # figures whose inputs did not change are not drawn again
        self._thread = threading.Thread(target=self._loop, name="simcal-report", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Ask for a fresh report (served as soon as the current one is older than interval)."""
        self._wanted.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait()
            wait = self._last + self.interval - time.monotonic()
            if self._stop.is_set() or (wait > 0 and self._stop.wait(wait)):
                return
            self._wanted.clear()
            self.generate()

    def generate(self) -> None:
        """Write the report now (in the calling thread); failures are logged, not raised."""
        from simcal.reporting.page import write_report
        from simcal.reporting.studies import load_existing_study

        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            if self._study is None:  # its own storage connection, not the driver's
                self._study = load_existing_study(self.config.storage, self.config.study)
            write_report(self._study, self.config, self.directory, top=self.top,
                         storage_url=self.config.storage, cache=self._cache)
        except Exception as exc:
            log.warning("live report failed: %s: %s", type(exc).__name__, exc)
        finally:
            self._last = time.monotonic()
            self.generations += 1
            self.seconds += time.perf_counter() - wall
            self.cpu_seconds += time.thread_time() - cpu

    def close(self) -> None:
        self._stop.set()
        self._wanted.set()
        self._thread.join(timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)


class DriverHTTP:
    """The driver's HTTP server: metrics, and the live report unless ``interval`` is 0."""

    def __init__(
        self, metrics: Metrics, config: CalibrationConfig, port: int, host: str, interval: float
    ) -> None:
        self.live = LiveReport(config, interval=interval) if interval > 0 else None
        source = (
            ReportSource(self.live.directory, self.live.request, interval) if self.live else None
        )
        try:
            self._server = HTTPServer(make_app(metrics.registry, config.study, source), port, host)
        except BaseException:
            self.close()
            raise
        self.port = self._server.port

    def close(self) -> None:
        if getattr(self, "_server", None) is not None:
            self._server.close()
        if self.live is not None:
            self.live.close()
