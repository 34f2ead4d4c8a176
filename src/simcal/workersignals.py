"""A local worker ignores the terminal's Ctrl-C: a Dask preload module (``dask_setup``).

A Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the driver and
every worker process of the LocalCluster it started. Workers that got it died mid-task, each
with a traceback, and the driver then waited its grace period for trials that could no longer
finish. simcal's local cluster preloads this module in every worker process (also in one the
nanny restarts): the worker ignores SIGINT, and the driver alone decides what a Ctrl-C does
(it stops the workers itself). SIGTERM and SIGKILL still reach them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


def ignore_terminal_interrupt() -> None:
    """Ignore SIGINT in this process (only possible from its main thread: elsewhere, no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def interrupt_ignored_while_starting() -> Iterator[None]:
    """SIGINT ignored in this process while the block starts processes, which inherit the
    disposition (Python and Dask leave an inherited SIG_IGN alone); restored after. Off the
    main thread nothing changes (only it may set handlers)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, run in the worker process as it starts."""
    ignore_terminal_interrupt()

