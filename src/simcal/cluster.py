"""A connected Dask client: to a running scheduler, or to a LocalCluster started here."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import dask
from distributed import Client, LocalCluster

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

    @property
    def required_workers(self) -> int:
        if self.min_workers is not None:
            return self.min_workers
        return self.workers if self.scheduler is None else 1


def check_versions(client: Client) -> None:
    """Fail on version skew of required packages between client, scheduler and workers."""
    try:
        client.get_versions(check=True)
    except ValueError as exc:
        raise ClusterError(
            f"version mismatch between client, scheduler and workers: {exc}"
        ) from None


# Dask's idle work per process (a 10 ms stack profiler, a 20 ms event-loop tick, a 100 ms
# memory monitor) costs about a core at 32 workers on a small machine (docs/performance.md).
# The local cluster's scheduler and workers (which inherit the driver's config) run without
# the profiler and with 1 s ticks; the chart sets the same through DASK_* variables.
QUIET_DASK = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
}


def quiet_dask_config() -> dict[str, object]:
    """:data:`QUIET_DASK`, except keys the user set through ``DASK_*`` environment variables."""
    return {
        key: value
        for key, value in QUIET_DASK.items()
        if "DASK_" + key.upper().replace(".", "__").replace("-", "_") not in os.environ
    }


@contextlib.contextmanager
def connect(options: ClusterOptions) -> Iterator[Client]:
    """Yield a client with at least ``required_workers`` workers, closing what was started."""
    with contextlib.ExitStack() as stack:
        if options.scheduler:
            log.info("connecting to scheduler %s", options.scheduler)
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
            try:
                stack.enter_context(dask.config.set(quiet_dask_config()))
                local = LocalCluster(
                    n_workers=options.workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=options.dashboard_address,
                    memory_limit=options.worker_memory_limit or "auto",
                    security=options.security,
                    host="127.0.0.1",
                )
            except (RuntimeError, OSError, ValueError) as exc:
                raise ClusterError(
                    f"cannot start a local cluster (dashboard {options.dashboard_address}): {exc}"
                ) from None
            cluster = stack.enter_context(local)
            client = Client(cluster, security=options.security)
        stack.enter_context(client)
        try:
            client.wait_for_workers(options.required_workers, timeout=options.connect_timeout)
        except TimeoutError:
            have = len(client.scheduler_info(n_workers=-1)["workers"])
            raise ClusterError(
                f"only {have} of the required {options.required_workers} workers joined "
                f"within {options.connect_timeout:.0f}s"
            ) from None
        check_versions(client)
        log.info("connected to scheduler %s", client.scheduler.address)
        yield client
