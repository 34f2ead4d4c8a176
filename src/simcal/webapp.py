"""The driver's HTTP server: ``/metrics`` (Prometheus), ``/report`` (the live report) and an
index at ``/``, as one WSGI app wrapping ``prometheus_client.make_wsgi_app``.

``/report/<file>`` serves only the files the report wrote (a plain name in the report's own
folder, no directory listing, no ``..``); everything else is 404.
"""

from __future__ import annotations

import html
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
REPORT_FILES = (".html", ".png")
INDEX = (
    "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>simcal driver</title>"
    "<style>body{{font-family:system-ui,sans-serif;margin:2em}}li{{margin:.4em 0}}</style>"
    "</head><body><h1>simcal driver: {study}</h1><ul>"
    "<li><a href='report/'>report</a>: the fit, losses, parameters and throughput "
    "(regenerated at most every {interval:g} s)</li>"
    "<li><a href='metrics'>metrics</a>: Prometheus metrics</li></ul></body></html>"
)
WAITING = (
    "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
    "<meta http-equiv='refresh' content='3'><title>simcal report</title></head><body>"
    "<p>The report is being generated; this page reloads in 3 s.</p></body></html>"
)


class ReportSource:
    """Where the live report's files are (the folder of its last complete page, None before
    the first), and a way to ask for a fresh one."""

    def __init__(
        self, directory: Callable[[], Path | None], refresh: Callable[[], None], interval: float
    ) -> None:
        self.directory = directory
        self.refresh = refresh
        self.interval = interval


def _respond(
    start_response: StartResponse, status: str, body: bytes, content_type: str
) -> list[bytes]:
    start_response(
        status,
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
        ],
    )
    return [body]


def report_file(directory: Path, name: str) -> Path | None:
    """The report's file ``name`` if it is one: a plain file name, in ``directory`` itself."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        return None
    if not name.endswith(REPORT_FILES):
        return None
    path = directory / name
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if resolved.parent != directory.resolve() or not resolved.is_file():
        return None
    return resolved


def make_app(registry: CollectorRegistry, study: str, report: ReportSource | None) -> WSGIApp:
    """The WSGI app: ``/``, ``/metrics`` and, if ``report`` is given, ``/report/``."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics(environ, start_response)
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", b"", "text/plain")
        if path == "/":
            interval = report.interval if report else 0
            page = INDEX.format(study=html.escape(study), interval=interval)
            if report is None:
                page = page.replace("<li><a href='report/'>", "<li hidden><a href='report/'>")
            return _respond(start_response, "200 OK", page.encode(), "text/html; charset=utf-8")
        if report is not None and path == "/report":
            start_response("301 Moved Permanently", [("Location", "report/"),
                                                     ("Content-Length", "0")])
            return [b""]
        if report is not None and path.startswith("/report/"):
            name = path.removeprefix("/report/") or "report.html"
            if name == "report.html":
                report.refresh()
            kind = "image/png" if name.endswith(".png") else "text/html; charset=utf-8"
            for _ in range(2):  # a page swapped out and removed while read: the new one
                folder = report.directory()  # once: the whole request reads one page's folder
                found = None if folder is None else report_file(folder, name)
                if found is None:
                    break
                try:
                    return _respond(start_response, "200 OK", found.read_bytes(), kind)
                except OSError:
                    continue
            if folder is None and name == "report.html":  # only before the first page
                start_response("503 Service Unavailable", [
                    ("Content-Type", "text/html; charset=utf-8"), ("Retry-After", "3"),
                    ("Content-Length", str(len(WAITING))), ("Cache-Control", "no-store")])
                return [WAITING.encode()]
        return _respond(start_response, "404 Not Found", b"not found\n", "text/plain")

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


class _Server(ThreadingWSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class HTTPServer:
    """The app served from a daemon thread; ``close`` stops it."""

    def __init__(self, app: WSGIApp, port: int, host: str = "0.0.0.0") -> None:
        server_class = _Server6 if ":" in host else _Server
        self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="simcal-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
