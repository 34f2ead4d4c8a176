"""Jupyter display: whether code runs in a notebook kernel, and progress drawn in place there.

A notebook has no terminal, so rich's bar (which needs ipywidgets there) and the log lines
(which a kernel does not show without logging configured) both leave the user blind. This
draws one HTML line, updated in place through an IPython display handle: plain Jupyter
messages, no widget library, and the last state stays in the saved notebook.
"""

from __future__ import annotations

import html
import sys
import time

from simcal.progress import ProgressReporter, Snapshot

UPDATE_SECONDS = 0.5  # at most two redraws a second: each is a message to the front end


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (IPython's ZMQ shell, or Colab's)."""
    ipython_module = sys.modules.get("IPython")
    if ipython_module is None:
        return False
    shell = ipython_module.get_ipython()
    if shell is None:
        return False
    return type(shell).__name__ == "ZMQInteractiveShell" or "google.colab" in type(shell).__module__


def show_figures_inline() -> None:
    """In a notebook, have matplotlib Figures display as PNG when no format is set for them:
    simcal draws with matplotlib's object API, so pyplot's inline backend may never have
    registered one (a returned Figure would show as its text repr)."""
    if not in_notebook():
        return
    from IPython import get_ipython
    from IPython.core.pylabtools import select_figure_formats
    from matplotlib.figure import Figure

    shell = get_ipython()
    formatters = shell.display_formatter.formatters
    for kind in ("image/png", "image/svg+xml", "image/jpeg", "application/pdf"):
        try:
            formatters[kind].lookup_by_type(Figure)
            return  # the user's (or pyplot's) choice stands
        except KeyError:
            continue
    select_figure_formats(shell, {"png"})


class _Line:
    """One progress line with an HTML and a plain-text form."""

    def __init__(self, done: int, total: int, status: str, finished: bool) -> None:
        self.done, self.total, self.status, self.finished = done, total, status, finished

    def __repr__(self) -> str:
        word = "calibrated" if self.finished else "calibrating"
        return f"{word} {self.done}/{self.total}  {self.status.strip()}"

    def _repr_html_(self) -> str:
        word = "calibrated" if self.finished else "calibrating"
        return (
            f"<div style='font-family:monospace'><b>{word}</b> "
            f"<progress value='{self.done}' max='{max(self.total, 1)}'></progress> "
            f"{self.done}/{self.total} &nbsp; {html.escape(self.status.strip())}</div>"
        )


class NotebookProgress(ProgressReporter):
    """Progress in a notebook: one HTML line under the cell, redrawn in place."""

    def __init__(self) -> None:
        super().__init__(interactive=False)
        self._handle = None
        self._drawn = 0.0

    def __enter__(self) -> NotebookProgress:
        from IPython.display import display

        self._handle = display(_Line(0, 0, "starting", False), display_id=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle = None

    def show(self, snapshot: Snapshot, status: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._handle is None or (not force and now - self._drawn < UPDATE_SECONDS):
            return
        self._drawn = now
        self._handle.update(_Line(snapshot.done, snapshot.total, status, force))
