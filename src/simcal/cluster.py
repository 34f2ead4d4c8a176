"""A connected Dask client: to a running scheduler, or to a LocalCluster started here."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from simcal.config import ConfigError
from simcal.workersignals import interrupt_ignored_while_starting
from simcal.workerstart import forkserver_workers

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The cluster cannot be reached, has too few workers, or runs mismatched versions."""


@dataclass(frozen=True)
class ClusterOptions:
    """How to get a cluster: ``scheduler`` address, or a local one of ``workers`` processes."""

    scheduler: str | None = None
    workers: int = 8
    min_workers: int | None = None
    connect_timeout: float = 120.0
    dashboard_address: str | None = "127.0.0.1:8787"
    worker_memory_limit: str | None = None
    security: object | None = None
    # installed modules a local cluster's worker-start server imports once for all its workers
    # (the model's own imports: simcal.shipping.installed_imports); nothing for a scheduler
    preload: tuple[str, ...] = ()

    @property
    def required_workers(self) -> int:
        if self.min_workers is not None:
            return self.min_workers
        return self.workers if self.scheduler is None else 1


# Dask's own log records that repeat what simcal tells once per failed trial (its reason and
# the first line of its error; the text in `simcal results`), or that a deliberate stop of a
# local cluster causes: logger name -> message prefixes. A local cluster's scheduler lives in
# the driver, on loopback: a worker's heartbeat fails only when the driver closes it, and a
# heartbeat in flight then logs a traceback (dask/distributed#7105).
_NOISE = {
    "distributed.worker": (
        "Compute Failed",
        "Failed to communicate with scheduler during heartbeat",
    ),
    "distributed.worker.state_machine": ("Async instruction for",),
    "distributed.nanny": ("Worker process still alive after",),
}


class _DropNoise(logging.Filter):
    """Drops the records in :data:`_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        prefixes = _NOISE.get(record.name, ())
        return not (prefixes and str(record.msg).startswith(prefixes))


def quiet_dask_logs() -> None:
    """Drop Dask's per-task failure blocks and shutdown warnings in this process (idempotent)."""
    for name in _NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


class QuietWorkerLogs(WorkerPlugin):
    """Runs :func:`quiet_dask_logs` in each worker process of a local cluster."""

    name = "simcal-quiet-logs"

    def setup(self, worker: object) -> None:
        quiet_dask_logs()


def security_from_files(
    ca_file: Path | None, cert: Path | None, key: Path | None
) -> object | None:
    """Dask TLS for the client (and a local cluster's scheduler and workers), or None."""
    files = (ca_file, cert, key)
    if not any(files):
        return None
    if not all(files):
        raise ConfigError("--tls-ca-file, --tls-cert and --tls-key must be given together")
    for path in files:
        if not path.is_file():
            raise ConfigError(f"TLS file {str(path)!r} does not exist")
    from distributed.security import Security

    # The client uses the certificate; a local cluster's scheduler and workers do too.
    return Security(
        tls_ca_file=str(ca_file),
        tls_client_cert=str(cert),
        tls_client_key=str(key),
        tls_scheduler_cert=str(cert),
        tls_scheduler_key=str(key),
        tls_worker_cert=str(cert),
        tls_worker_key=str(key),
        require_encryption=True,
    )


def check_scheduler_address(address: str, source: str, security: object | None) -> None:
    """An address Dask can connect to, with TLS options exactly when it is ``tls://``."""
    import dask
    from distributed.comm import parse_address
    from distributed.comm.registry import get_backend

    try:
        scheme, _ = parse_address(address)
        get_backend(scheme)
    except (ValueError, TypeError, ImportError) as exc:
        raise ConfigError(f"{source} {address!r}: {exc}") from None
    configured = dask.config.get("distributed.comm.tls.ca-file", default=None)
    if scheme == "tls" and security is None and not configured:
        raise ConfigError(
            f"{source} {address!r}: a tls:// scheduler needs --tls-ca-file, --tls-cert, --tls-key"
        )
    if scheme != "tls" and security is not None:
        raise ConfigError(f"{source} {address!r}: TLS options given, but the address is not tls://")


def _wait_for_name(address: str, timeout: float) -> None:
    """Wait until the scheduler's host name resolves (a new Service's DNS name may lag);
    a :class:`ClusterError` saying the name does not resolve if it never does."""
    from distributed.comm import get_address_host

    try:
        host = get_address_host(address)
    except ValueError:
        return  # not host:port (e.g. inproc): Dask says what is wrong
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except socket.gaierror as exc:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"cannot connect to scheduler {address}: the name {host!r} does not resolve "
                    f"({exc.strerror}; waited {timeout:.0f}s)"
                ) from None
            log.debug("scheduler host %s does not resolve yet: %s", host, exc)
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))


def check_versions(client: Client) -> None:
    """Fail on version skew of required packages between client, scheduler and workers."""
    try:
        client.get_versions(check=True)
    except ValueError as exc:
        raise ClusterError(
            f"version mismatch between client, scheduler and workers: {exc}"
        ) from None


# Dask's idle work per process (a 10 ms stack profiler, a 20 ms event-loop tick, a 100 ms
# memory monitor, a 500 ms system monitor reading every disk's counters) costs about a core
# at 32 workers on a small machine (docs/performance.md). The local cluster's scheduler,
# nannies and workers (which inherit the driver's config) run without the profiler, with 1 s
# ticks and a 2 s system monitor that skips disks (the dashboard's System page loses its disk
# plot); the chart sets the same through DASK_* variables.
QUIET_DASK = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.system-monitor.disk": False,
}


def quiet_dask_config() -> dict[str, object]:
    """:data:`QUIET_DASK`, except keys the user set through ``DASK_*`` environment variables."""
    return {
        key: value
        for key, value in QUIET_DASK.items()
        if "DASK_" + key.upper().replace(".", "__").replace("-", "_") not in os.environ
    }


def wait_for_workers(client: Client, need: int, timeout: float, where: str = "") -> None:
    """Wait until ``need`` workers joined, else :class:`ClusterError` saying how many did."""
    try:
        client.wait_for_workers(need, timeout=timeout)
    except TimeoutError:
        have = len(client.scheduler_info(n_workers=-1)["workers"])
        raise ClusterError(
            f"only {have} of the required {need} workers joined{where} within {timeout:.0f}s"
        ) from None


@contextlib.contextmanager
def connect(options: ClusterOptions) -> Iterator[Client]:
    """Yield a client with at least ``required_workers`` workers, closing what was started."""
    with contextlib.ExitStack() as stack:
        if options.scheduler:
            log.info("connecting to scheduler %s", options.scheduler)
            _wait_for_name(options.scheduler, options.connect_timeout)
            try:
                client = Client(
                    options.scheduler, timeout=options.connect_timeout, security=options.security
                )
            except (OSError, TimeoutError) as exc:
                raise ClusterError(
                    f"cannot connect to scheduler {options.scheduler} "
                    f"within {options.connect_timeout:.0f}s: {exc}"
                ) from None
        else:
            log.info("starting a local cluster of %d worker processes", options.workers)
            quiet_dask_logs()
            try:
                stack.enter_context(dask.config.set(quiet_dask_config()))
                stack.enter_context(forkserver_workers(options.preload))
                with warnings.catch_warnings():
                    # a busy dashboard port: Dask picks a free one, logged below with the link
                    warnings.filterwarnings("ignore", "Port .* is already in use", UserWarning)
                    local = _local_cluster(options)
            except (RuntimeError, OSError, ValueError) as exc:
                raise ClusterError(
                    f"cannot start a local cluster (dashboard {options.dashboard_address}): {exc}"
                ) from None
            cluster = stack.enter_context(local)
            client = Client(cluster, security=options.security)
            client.register_plugin(QuietWorkerLogs())
        stack.enter_context(client)
        wait_for_workers(client, options.required_workers, options.connect_timeout)
        check_versions(client)
        log.info("connected to scheduler %s", client.scheduler.address)
        yield client


# Preloaded in every local worker process: it ignores the terminal's Ctrl-C (the driver stops it).
WORKER_PRELOAD = "simcal.workersignals"


def _local_cluster(options: ClusterOptions) -> LocalCluster:
    """A LocalCluster whose worker processes never get the terminal's Ctrl-C.

    They start with SIGINT ignored (a disposition a new process inherits, which Python and
    Dask then leave alone: the worker server is started with it ignored, and so are workers
    spawned where the user chose spawn), and :data:`WORKER_PRELOAD` ignores it in any worker
    the nanny restarts later. A Ctrl-C while the cluster starts (a second or two) is lost too.
    """
    with interrupt_ignored_while_starting():
        return _start_local_cluster(options)


def _start_local_cluster(options: ClusterOptions) -> LocalCluster:
    return LocalCluster(
        n_workers=options.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=options.dashboard_address,
        memory_limit=options.worker_memory_limit or "auto",
        security=options.security,
        host="127.0.0.1",
        preload=[WORKER_PRELOAD],
    )
