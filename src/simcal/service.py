"""SimulationService: the only code that touches Dask futures.

It submits replicate and aggregation tasks with unique keys and reproducible seeds,
and gathers results the fast way: wait for all futures at once, then fetch every
successful result in one batched transfer, returning failures as values.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed import Client, Future, as_completed, wait
from distributed.client import FuturesCancelledError

from simcal.config import TargetSpec
from simcal.failures import NonFiniteLossError, ResultLostError
from simcal.targets import load_observed, make_objective
from simcal.tasks import aggregate, run_replicate

__all__ = [
    "SEED_MODULUS",
    "NonFiniteLossError",
    "ResultStream",
    "SimulationService",
    "replicate_seed",
]

log = logging.getLogger(__name__)

SEED_MODULUS = 2**31 - 1
"""Seeds handed to a model lie in [0, SEED_MODULUS): any seeding API accepts them (a prime)."""
CANCELLATION_TIMEOUT = 5.0  # s: reading a cancelled future's error is one loop round trip


def replicate_seed(seed: int, trial_id: str, index: int) -> int:
    """A reproducible seed in [0, 2**31 - 1] for one replicate of one trial, distinct within it.

    numpy's SeedSequence, keyed by (seed, trial), draws a multiplier and an offset; the replicate
    index then goes through two permutations of the integers modulo the prime 2**31 - 1 (affine,
    then the fifth power, a bijection as gcd(5, 2**31 - 2) = 1): replicates of one trial never
    share a seed, and the seeds of neighbouring replicates are not an arithmetic progression.
    ``numpy.random.RandomState``, ``random.seed`` and Starsim's ``rand_seed`` accept them all.
    """
    key = np.random.SeedSequence(
        entropy=seed, spawn_key=(zlib.crc32(trial_id.encode()),)
    ).generate_state(2, dtype=np.uint64)
    multiplier = 1 + int(key[0]) % (SEED_MODULUS - 1)
    offset = int(key[1]) % SEED_MODULUS
    return pow(multiplier * ((offset + index) % SEED_MODULUS) % SEED_MODULUS, 5, SEED_MODULUS)


@dataclass(frozen=True)
class ClusterSnapshot:
    """The cluster as the scheduler last heard from its workers."""

    workers: int
    threads: int
    busy_threads: int


class SimulationService:
    """Submits trials' tasks to a Dask cluster and gathers their results."""

    def __init__(self, client: Client, run_id: str | None = None) -> None:
        self.client = client
        self.run_id = run_id or uuid.uuid4().hex[:8]

    def submit_replicates(
        self,
        model: Callable[..., Any] | str,
        params: Mapping[str, float],
        n_replicates: int,
        seed: int,
        *,
        trial_id: str,
        model_options: Mapping[str, Any] | None = None,
        first: int = 0,
    ) -> list[Future]:
        """Submit one task per replicate, keyed ``sim-<run_id>-<trial_id>-<i>``.

        The tasks go in one ``Client.map`` call: one graph update on the scheduler, not R.
        A ``module:callable`` model is sent as that reference and imported on the worker
        (:func:`simcal.tasks.resolve_on_worker`), so a worker without the module fails the
        task with ``ModelImportError`` rather than failing to unpickle it.
        """
        if n_replicates < 1:
            raise ValueError(f"n_replicates must be >= 1, got {n_replicates}")
        indices = range(first, first + n_replicates)  # ``first``: the rest of a judged trial
        return self.client.map(
            run_replicate,
            [model] * n_replicates,
            [dict(params)] * n_replicates,
            [replicate_seed(seed, trial_id, index) for index in indices],
            [dict(model_options or {})] * n_replicates,
            key=[f"sim-{self.run_id}-{trial_id}-{index}" for index in indices],
            pure=False,
        )

    def submit_aggregation(
        self,
        replicate_futures: Sequence[Future],
        target: TargetSpec,
        *,
        trial_id: str,
        observed: np.ndarray | None = None,
        loss: Callable[[np.ndarray, np.ndarray], float] | str | None = None,
        stage: str = "",
    ) -> Future:
        """Submit the loss of one target; the replicates are passed as task dependencies.

        The target's observed data and loss are loaded here unless given
        (the driver passes them, loaded once). A user's loss goes as its ``module:callable``
        reference and is imported on the worker, like the model.
        """
        if loss is None:
            loss = make_objective(target)  # a user's loss inside it is a reference
        if observed is None:
            observed = load_observed(target)
        return self.client.submit(
            aggregate,
            target.name,
            target.output_key,
            observed,
            loss,
            *replicate_futures,
            key=f"agg-{self.run_id}-{trial_id}-{target.name}" + (f"-{stage}" if stage else ""),
            pure=False,
        )

    def gather(
        self, futures: Sequence[Future], *, timeout: float | None = None
    ) -> list[object | BaseException]:
        """Results in input order; failures, cancellations and timeouts as exception values.

        Waits on all futures at once, then fetches every finished result in one
        batched ``Client.gather`` call. Never raises because a task failed.
        """
        futures = list(futures)
        if not futures:
            return []
        if not all(future.done() for future in futures):  # a stream's batch is done already
            # wait() raises if any future was cancelled; each outcome below says so instead
            with contextlib.suppress(TimeoutError, FuturesCancelledError):
                wait(futures, timeout=timeout)
        finished = {f.key: f for f in futures if f.status == "finished"}
        fetched = self.client.gather(finished, errors="skip") if finished else {}
        return [self._outcome(future, fetched) for future in futures]

    @staticmethod
    def _outcome(future: Future, fetched: Mapping[Any, object]) -> object | BaseException:
        status = future.status
        if status == "finished" and future.key in fetched:
            return fetched[future.key]
        if status == "error":
            return future.exception()
        if status == "cancelled":
            return _cancellation(future)
        if status == "pending":
            return TimeoutError(f"task {future.key} did not finish in time")
        return ResultLostError(f"the result of task {future.key} was lost (status {status})")

    def cancel(self, futures: Iterable[Future]) -> None:
        """Cancel futures (their tasks stop being scheduled; running ones finish unobserved)."""
        futures = list(futures)
        if futures:
            self.client.cancel(futures)

    def stream(self) -> ResultStream:
        """A :class:`ResultStream` that yields finished futures in batches."""
        return ResultStream(self)

    def cluster_snapshot(self) -> ClusterSnapshot:
        """Connected workers, their threads, and how many threads run a task (last heartbeat)."""
        workers = list(self.client.scheduler_info(n_workers=-1)["workers"].values())
        threads = busy = 0
        for worker in workers:
            nthreads = int(worker.get("nthreads", 1))
            executing = worker.get("metrics", {}).get("task_counts", {}).get("executing", 0)
            threads += nthreads
            busy += min(int(executing), nthreads)
        return ClusterSnapshot(len(workers), threads, busy)

    def restart_stuck_workers(self, futures: Iterable[Future]) -> list[str]:
        """Restart the workers still executing any of ``futures`` (hung tasks hold their slot).

        Every worker is asked what it runs: a cancelled task is gone from the scheduler
        (which then refuses its key) while its thread still runs on the worker.
        """
        keys = {f.key for f in futures}
        stacks = self.client.call_stack() if keys else {}
        stuck = [worker for worker, tasks in stacks.items() if keys & set(tasks)]
        if stuck:
            self.client.restart_workers(stuck, raise_for_error=False)
        return stuck


def _cancellation(future: Future) -> BaseException:
    """A cancelled future's own error: Dask's names why it was cancelled (its ``reason``)."""
    try:
        future.result(timeout=CANCELLATION_TIMEOUT)
    except CancelledError as exc:
        return exc
    except Exception as exc:  # the client closed meanwhile: the status still says cancelled
        log.debug("reading task %s's cancellation: %s", future.key, exc)
    return CancelledError(f"task {future.key} was cancelled")


class ResultStream:
    """Futures added as they are submitted, results taken in batches as they finish.

    Built on :class:`distributed.as_completed`; each batch of finished futures is
    fetched with one :meth:`SimulationService.gather` call.
    """

    def __init__(self, service: SimulationService) -> None:
        self._service = service
        self._completed = as_completed(loop=service.client.loop)

    def add(self, futures: Iterable[Future]) -> None:
        """Track more futures."""
        self._completed.update(list(futures))

    def pending(self) -> int:
        """Futures added and not yet returned."""
        return self._completed.count()

    def next_batch(self, timeout: float) -> list[tuple[Future, object | BaseException]]:
        """Every future finished so far, waiting up to ``timeout`` s for the first one."""
        deadline = time.monotonic() + timeout
        condition = self._completed.thread_condition
        while not self._completed.has_ready() and not self._completed.is_empty():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with condition:  # as_completed notifies under this lock after queueing
                if not self._completed.has_ready():
                    condition.wait(timeout=min(remaining, 0.1))
        batch = self._completed.next_batch(block=False)
        return list(zip(batch, self._service.gather(batch), strict=True))
