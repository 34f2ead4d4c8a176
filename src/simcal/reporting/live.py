"""The live report of a running calibration, drawn by a renderer process that a background
thread drives (never in the driver loop, never holding the driver's GIL).

It is always there: the renderer starts with the run, draws the first page with results as
soon as the first trials complete (or the study so far when someone asks before), then at
most every ``interval`` seconds while someone asks for it. Each page is drawn into a
fresh folder and swapped in whole when it is complete, so a page being drawn (or failing)
never blanks the last one; the renderer draws its first pages at normal priority (a page
within seconds even on a loaded machine), then at ``nice 10``."""

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
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import optuna

from simcal.config import CalibrationConfig
from simcal.metrics import Metrics
from simcal.webapp import HTTPServer, ReportSource, make_app

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30.0
EARLY_POLL = 0.5  # seconds between looks for the first completed trials
NICE = 10  # the renderer's niceness once its first pages are drawn


class LiveReport:
    """The last complete report page, kept fresh: :meth:`request` asks, a thread has the
    renderer process draw the next one into a new folder, then swaps it in.

    ``completed`` (the run's completed trials so far) lets the first page with results be
    drawn as soon as there are any, without waiting for a request or the interval.
    """

    def __init__(
        self,
        config: CalibrationConfig,
        *,
        interval: float = DEFAULT_INTERVAL,
        top: int = 5,
        completed: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.interval = interval
        self.top = top
        self.root = Path(tempfile.mkdtemp(prefix="simcal-report-"))
        self._completed = completed
        self._current: Path | None = None  # the folder of the last complete page
        self._previous: Path | None = None  # kept until the next swap: readers may be in it
        self._serial = 0
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

    @property
    def directory(self) -> Path | None:
        """The folder of the last complete page (None until the first one is drawn)."""
        return self._current

    def request(self) -> None:
        """Ask for a fresh report (served as soon as the current one is older than interval)."""
        self._wanted.set()

    def _loop(self) -> None:
        if self._completed is not None:
            self._early()
        while not self._stop.is_set():
            self._wanted.wait()
            wait = self._last + self.interval - time.monotonic()
            if self._stop.is_set() or (wait > 0 and self._stop.wait(wait)):
                return
            self._wanted.clear()
            self.generate()

    def _early(self) -> None:
        """The renderer starts with the run (its imports done before a page is wanted) and
        draws the first page with results as soon as there are any, without waiting for a
        request or the interval; someone looking before that gets the study so far."""
        with contextlib.suppress(OSError):
            self._start_renderer()
        while not self._stop.is_set():
            if self._completed is not None and self._completed() > 0:
                self.generate(early=True)
                return
            if self._wanted.is_set() and self._current is None:
                self._wanted.clear()
                self.generate(early=True)
            self._stop.wait(EARLY_POLL)

    def generate(self, *, early: bool = False) -> None:
        """Have the renderer process draw the report now into a new folder and swap it in
        when complete; failures are logged, not raised, and leave the last page served.

        Drawing happens in a separate process: a thread would hold the driver's GIL while
        matplotlib draws, and that measurably slowed the driver loop (see
        docs/performance.md). This thread only waits on the pipe. ``early`` pages are drawn
        at the renderer's normal priority, later ones at ``nice 10``.
        """
        if self._stop.is_set():
            return
        wall = time.perf_counter()
        folder = self.root / f"page-{self._serial}"
        self._serial += 1
        done = False
        try:
            if self._renderer is None or not self._renderer.is_alive():
                self._start_renderer()
            assert self._connection is not None
            self._connection.send((str(folder), 0 if early else NICE))
            cpu, error = self._connection.recv()
            self.cpu_seconds += cpu
            if error:
                log.warning("live report failed: %s", error)
            else:
                done = True
                self._swap(folder)
        except (OSError, EOFError) as exc:  # the renderer died (e.g. killed); start a new one
            if not self._stop.is_set():
                log.warning("live report renderer stopped: %s", exc)
            self._renderer = None
        finally:
            if not done:
                shutil.rmtree(folder, ignore_errors=True)
            self._last = time.monotonic()
            self.generations += 1
            self.seconds += time.perf_counter() - wall

    def _swap(self, folder: Path) -> None:
        """Serve ``folder`` from now on; the page before last is removed (one reference
        assignment: a request sees the old page or the new one, never a half-drawn one)."""
        stale, self._previous, self._current = self._previous, self._current, folder
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)

    def _start_renderer(self) -> None:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._renderer = context.Process(
            target=_render_loop,
            args=(theirs, self.config.model_dump(mode="json"), self.top),
            name="simcal-report-renderer",
            daemon=True,
        )
        self._renderer.start()
        theirs.close()
        self._connection = ours

    def close(self, *, finish: bool = False) -> None:
        """Stop drawing and remove every page. A page being drawn is dropped (the driver's
        exit does not wait for it), or with ``finish`` drawn to the end (to count it)."""
        self._stop.set()
        self._wanted.set()
        if finish:
            self._thread.join(timeout=60)
        renderer = self._renderer
        if renderer is not None:
            renderer.terminate()  # only draws pages; nothing of the study is lost
            renderer.join(timeout=10)
            if renderer.is_alive():
                renderer.kill()
                renderer.join(timeout=10)
        self._thread.join(timeout=60)
        late = self._renderer  # started by a page begun just as close() was called
        if late is not None and late is not renderer and late.is_alive():
            late.kill()
            late.join(timeout=10)
        self._current = self._previous = None
        shutil.rmtree(self.root, ignore_errors=True)


def _render_loop(connection: Connection, config: dict, top: int) -> None:
    """The renderer process: a report per request ``(folder, niceness)``, until ``None``;
    replies (CPU s, error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when to stop
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
        folder, niceness = request
        with contextlib.suppress(OSError):
            os.nice(max(niceness - os.nice(0), 0))  # only ever up: a user cannot go back
        cpu, error = time.process_time(), None
        try:
            if study is None:  # its own storage connection, not the driver's
                study = load_existing_study(settings.storage, settings.study)
            write_report(study, settings, Path(folder), top=top,
                         storage_url=settings.storage, cache=cache)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        connection.send((time.process_time() - cpu, error))


class DriverHTTP:
    """The driver's HTTP server: metrics, and the live report unless ``interval`` is 0."""

    def __init__(
        self, metrics: Metrics, config: CalibrationConfig, port: int, host: str, interval: float
    ) -> None:
        self.live = (
            LiveReport(config, interval=interval, completed=metrics.completed_trials)
            if interval > 0
            else None
        )
        source = (
            ReportSource(lambda: self.live.directory, self.live.request, interval)
            if self.live
            else None
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
