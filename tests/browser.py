"""Headless Chromium driven over the DevTools protocol (websocket-client), for the tests that
look at the report as a person would: load a page, collect console errors, evaluate
JavaScript, take a full-page screenshot. Debian's ``chromium`` package
(scripts/install-system-deps.sh)."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import websocket

from processes import start

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One tab: send DevTools commands, keep the console errors it reports."""

    def __init__(self, url: str) -> None:
        self._socket = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self._ids = itertools.count(1)
        self.errors: list[str] = []
        self._events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _note(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(json.dumps(params.get("args")))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(params.get("exceptionDetails")))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(params["entry"].get("text", ""))
        self._events.append(message)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._note(message)

    def wait_for(self, event: str, timeout: float = 60) -> None:
        if any(m.get("method") == event for m in self._events):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv())
            self._note(message)
            if message.get("method") == event:
                return
        raise TimeoutError(event)

    def open(self, url: str, width: int = 1200, height: int = 900) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self._events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"]))
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        self._socket.close()


@contextmanager
def chromium() -> Iterator[Page]:
    """A fresh headless Chromium (own profile folder) and its first tab; reaped on exit."""
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("chromium is not installed: run `make system-deps`")
    profile = Path(tempfile.mkdtemp(prefix="simcal-chromium-"))
    logs = Path(tempfile.mkdtemp(prefix="simcal-chromium-log-"))
    process = start(
        "chromium", [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"], logs
    )
    page = None
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().strip()):
            if not process.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start:\n{process.output()[-2000:]}")
            time.sleep(0.1)
        port = int(active.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            targets = json.load(reply)
        target = next(t for t in targets if t["type"] == "page")
        page = Page(target["webSocketDebuggerUrl"])
        yield page
    finally:
        if page is not None:
            page.close()
        process.stop()
        shutil.rmtree(profile, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
