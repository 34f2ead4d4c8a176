"""How a local cluster's worker processes start: forked from one server that imported the model.

Dask's default, spawn, starts each worker as a new interpreter that imports distributed,
simcal and then the model's packages: for 4 workers of a Starsim model about 7 CPU-seconds
before the first trial (docs/starsim.md). A forkserver (Python's multiprocessing, selected
through Dask's ``distributed.worker.multiprocessing-method``) imports them once, and every
worker (also one the nanny restarts) is forked from it: a fresh process without the driver's
threads, given the driver's sys.path and working directory as spawn gives them. It imports
with garbage collection off and freezes what it imported before it forks
(:mod:`simcal.workergc`).
``simcal run`` starts it before it reads the config (:func:`prestart_for_config`, called by
:mod:`simcal.launch` before the CLI loads), so it imports while the driver does; the cluster
adopts it and stops it on close (:func:`forkserver_workers`). A start method the user set
(``DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD`` or a Dask config file) wins; a config
file is read once the CLI imports Dask, and a server started before that is then stopped. Nearly a
leaf (of simcal only :mod:`simcal.workersignals`, :mod:`simcal.configfile` and
:mod:`simcal.shipping`, which need no more than the standard library and PyYAML; distributed
only when a cluster starts), so the console script can call it first.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from simcal.workersignals import interrupt_ignored_while_starting

log = logging.getLogger(__name__)

WORKER_START_METHOD = "forkserver"
_START_METHOD_KEY = "distributed.worker.multiprocessing-method"
# what every local worker imports before its first task, beside the model's packages
WORKER_MODULES = ("distributed", "simcal.tasks", "simcal.workersignals")
# the server's first and last imports: no collection while it imports, then all of it frozen
GC_OFF, GC_FROZEN = "simcal.workergc", "simcal.workergc.frozen"


def _start_method_chosen_by_user(*, early: bool = False) -> bool:
    """Whether the user chose how local workers start: a ``DASK_*`` variable, or Dask's config
    (a config file, ``dask.config.set``). ``early`` (the console script's first step): Dask's
    config is read only if Dask is already imported; importing it (0.1 s, on the path to the
    first worker) is left to the CLI's next call, which stops a server started in vain."""
    env = "DASK_" + _START_METHOD_KEY.upper().replace(".", "__").replace("-", "_")
    if env in os.environ:
        return True
    if early and "dask.config" not in sys.modules:
        return False
    import dask.config  # a Dask config file may set the method

    if dask.config.get(_START_METHOD_KEY, default="spawn") != "spawn":
        return True
    # spawn is Dask's default: a config file that names it chose it all the same
    return dask.config.get(_START_METHOD_KEY, None, config=dask.config.collect()) is not None


def _forkserver_pid() -> int | None:
    """The running forkserver's pid, or None. multiprocessing keeps it private: read through
    getattr, so a Python that renames it only loses the stop below, never the run."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    return getattr(server, "_forkserver_pid", None)


def _stop_forkserver() -> None:
    """Stop the forkserver (its workers are gone): a notebook's next cluster starts a fresh one
    with the current environment and model, and no idle process outlives the cluster.

    SIGTERM first: asked politely (its "alive" pipe closed) it tears down every module it
    imported (a Starsim model's: about 0.5 s) while the driver waits; it has nothing to save.
    """
    pid = _forkserver_pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    stop = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        stop()  # closes its pipe, reaps it, removes its socket file


_prestarted: int | None = None  # the pid of the server prestart_workers started
_unlogged: str | None = None  # what an early start imports, until the CLI logs it


def _preload_list(preload: Sequence[str]) -> list[str]:
    """What the server imports when it starts, in order: :data:`WORKER_MODULES` and
    ``preload`` (what it cannot import it skips: multiprocessing.forkserver.main), between
    :data:`GC_OFF` and :data:`GC_FROZEN` (:mod:`simcal.workergc`)."""
    modules = dict.fromkeys([*WORKER_MODULES, *preload])
    return [GC_OFF, *(m for m in modules if m not in (GC_OFF, GC_FROZEN)), GC_FROZEN]


def _set_preload(preload: Sequence[str]) -> None:
    """Dask's forkserver context told to import :func:`_preload_list` when it starts."""
    from distributed.utils import get_mp_context

    # Dask sets its own list on its first call (once per process): call it, then replace it
    get_mp_context().set_forkserver_preload(_preload_list(preload))


def prestart_workers(preload: Sequence[str], *, early: bool = False) -> None:
    """Start the local cluster's worker server now, so it imports ``preload`` while the driver
    reads its config (which imports the model too): on two cores the two imports overlap.
    :func:`forkserver_workers` adopts it. SIGINT is ignored while it starts, as for workers.

    ``early``: called before logging is set up (:mod:`simcal.launch`); the next call, from the
    CLI, finds the server running and logs its start then.
    """
    global _prestarted, _unlogged
    if _start_method_chosen_by_user(early=early):
        stop_prestarted_workers()  # started early, before Dask's config was read
        return
    running = _forkserver_pid()
    if running is not None:
        if _unlogged is not None and running == _prestarted:
            log.debug("worker server %s started before the CLI loaded, importing %s",
                      running, _unlogged)
            _unlogged = None
        return
    # not through Dask (importing distributed here would delay the start by half a second);
    # a list Dask sets later only applies to a server started after this one
    multiprocessing.get_context("forkserver").set_forkserver_preload(_preload_list(preload))
    with interrupt_ignored_while_starting():
        multiprocessing.forkserver.ensure_running()  # returns at once; it imports alone
    _prestarted = _forkserver_pid()
    if early:
        _unlogged = ", ".join(preload)
    else:
        log.debug("worker server %s started, importing %s", _prestarted, ", ".join(preload))


def prestart_for_config(config: str | Path | None, *, early: bool = False) -> None:
    """:func:`prestart_workers` for the model a config file names (the demo's without one),
    peeked at before anything is validated; its local module's installed imports, read from
    its source (:func:`simcal.shipping.source_imports`)."""
    from simcal.configfile import DEMO_MODEL, peek_model
    from simcal.shipping import source_imports

    if config is None:
        reference, folder = DEMO_MODEL, None
    else:
        reference, folder = peek_model(config), Path(config).resolve().parent
    if reference:
        prestart_workers(source_imports(reference, folder), early=early)


def stop_prestarted_workers() -> None:
    """Stop a server :func:`prestart_workers` started that no cluster adopted (a run that ended
    before its cluster started)."""
    global _prestarted, _unlogged
    if _prestarted is not None and _forkserver_pid() == _prestarted:
        log.debug("worker server %s stopped: not used", _prestarted)
        _stop_forkserver()
    _prestarted = _unlogged = None


@contextlib.contextmanager
def forkserver_workers(preload: Sequence[str]) -> Iterator[None]:
    """While open, local worker processes are forked from a server that imported
    :data:`WORKER_MODULES` and ``preload`` once (or the one
    :func:`prestart_workers` started); stopped on close if it is ours. A no-op where the
    user chose the start method."""
    global _prestarted
    if _start_method_chosen_by_user():
        stop_prestarted_workers()  # started early, before Dask's config was read
        yield
        return
    import dask.config

    with dask.config.set({_START_METHOD_KEY: WORKER_START_METHOD}):
        running = _forkserver_pid()
        ours = running is None or running == _prestarted
        if running is None:
            _set_preload(preload)
        try:
            yield
        finally:
            if ours:
                _stop_forkserver()
                _prestarted = None
