"""The live report of a running calibration: regenerated at most every ``interval`` seconds,
only while someone asks for it, by a niced renderer process that a background thread drives;
never in the driver loop, never holding the driver's GIL."""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import optuna

from simcal.config import CalibrationConfig
from simcal.metrics import Metrics
from simcal.webapp import HTTPServer, ReportSource, make_app

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30.0


class LiveReport:
    """A report folder kept fresh on demand: :meth:`request` asks, a thread has the renderer
    process redraw it."""

    def __init__(
        self, config: CalibrationConfig, *, interval: float = DEFAULT_INTERVAL, top: int = 5
    ) -> None:
        self.config = config
        self.interval = interval
        self.top = top
        self.directory = Path(tempfile.mkdtemp(prefix="simcal-report-"))
        self.generations = 0
        self.seconds = 0.0  # wall seconds spent generating
        self.cpu_seconds = 0.0  # CPU seconds of the renderer process
        self._last = -math.inf
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._renderer: multiprocessing.process.BaseProcess | None = None
        self._connection: Connection | None = None
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
        """Have the renderer process write the report now; failures are logged, not raised.

        Drawing happens in a separate, niced process: a thread would hold the driver's GIL
        while matplotlib draws, and that measurably slowed the driver loop (see
        docs/performance.md). This thread only waits on the pipe.
        """
        wall = time.perf_counter()
        try:
            if self._renderer is None or not self._renderer.is_alive():
                self._start_renderer()
            assert self._connection is not None
            self._connection.send(True)
            cpu, error = self._connection.recv()
            self.cpu_seconds += cpu
            if error:
                log.warning("live report failed: %s", error)
        except (OSError, EOFError) as exc:  # the renderer died (e.g. killed); start a new one
            log.warning("live report renderer stopped: %s", exc)
            self._renderer = None
        finally:
            self._last = time.monotonic()
            self.generations += 1
            self.seconds += time.perf_counter() - wall

    def _start_renderer(self) -> None:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._renderer = context.Process(
            target=_render_loop,
            args=(theirs, self.config.model_dump(mode="json"), str(self.directory), self.top),
            name="simcal-report-renderer",
            daemon=True,
        )
        self._renderer.start()
        theirs.close()
        self._connection = ours

    def close(self) -> None:
        self._stop.set()
        self._wanted.set()
        self._thread.join(timeout=60)
        if self._renderer is not None:
            with contextlib.suppress(OSError):
                assert self._connection is not None
                self._connection.send(None)
            self._renderer.join(timeout=10)
            if self._renderer.is_alive():
                self._renderer.kill()
                self._renderer.join(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


def _render_loop(connection: Connection, config: dict, directory: str, top: int) -> None:
    """The renderer process: a report per request, until ``None``; replies (CPU s, error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when to stop
    with contextlib.suppress(OSError):
        os.nice(10)
    from simcal.config import validate_config
    from simcal.reporting.page import write_report
    from simcal.reporting.studies import load_existing_study

    settings = validate_config(config)
    cache: dict = {}  # figures whose inputs did not change are not drawn again
    study: optuna.Study | None = None
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request is None:
            return
        cpu, error = time.process_time(), None
        try:
            if study is None:  # its own storage connection, not the driver's
                study = load_existing_study(settings.storage, settings.study)
            write_report(study, settings, Path(directory), top=top,
                         storage_url=settings.storage, cache=cache)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        connection.send((time.process_time() - cpu, error))


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
