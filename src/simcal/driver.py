"""The calibration loop: ask the optimizer for trials, run them, tell every one.

Streaming mode keeps enough trials in flight to keep every worker thread busy and
tells each trial as soon as its aggregations finish; batch mode (ask a batch,
one gather, tell all) exists for comparison. A trial's failure is told as a failed
trial with its reason; no asked trial is ever left untold. Nothing here touches
Dask futures beyond handing them back to :class:`SimulationService`.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import optuna
from distributed import Future
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from simcal.config import CalibrationConfig
from simcal.failfast import FailureStreak
from simcal.failures import (
    FailureReason,
    classify,
    describe,
    full_text,
    lost_with_the_scheduler,
)
from simcal.metrics import Metrics
from simcal.progress import ProgressReporter, Snapshot
from simcal.pruning import PARTIAL_STAGE, make_pruner
from simcal.samplers import make_sampler, run_seed
from simcal.service import SimulationService
from simcal.targets import make_objective
from simcal.tasks import FIT_ATTR_PREFIX, TargetLoss
from simcal.trials import (
    DURATION,
    ERROR,
    FAIL_REASON,
    INTERRUPTED,
    RETRY_OF,
    SURPLUS,
    Tally,
    Told,
    TrialStore,
)

log = logging.getLogger(__name__)

GatherFunction = Callable[[Sequence[Future], float | None], list[object | BaseException]]
POLL_SECONDS = 0.5
CLUSTER_REFRESH_SECONDS = 2.0
SCHEDULER_LOSS_SECONDS = 30.0
STORED_FITS = 20  # a trial's replicate summaries are stored if it is among the best 20 when told


class SchedulerLostError(RuntimeError):
    """The Dask scheduler went away during the calibration."""


@dataclass
class TrialRun:
    """One trial in flight: its futures and the target losses that have arrived."""

    trial: optuna.Trial
    started: float
    replicates: list[Future]
    aggregations: dict[str, str]  # future key -> target name
    futures: list[Future]
    losses: dict[str, TargetLoss] = field(default_factory=dict)
    partial: bool = False  # only its first ``pruning.min_replicates`` replicates are submitted

    @property
    def aggregation_futures(self) -> list[Future]:
        return [f for f in self.futures if f.key in self.aggregations]


@dataclass
class RunStats:
    """What this driver run did."""

    completed: int = 0
    failed: int = 0
    pruned: int = 0
    interrupted: int = 0
    recovered: int = 0  # other drivers' stale trials this run re-enqueued
    taken_over: int = 0  # results dropped: another driver had judged this one dead
    errors: dict[str, int] = field(default_factory=dict)
    stop_reason: str = "max_trials"
    elapsed: float = 0.0
    run_id: str = ""  # this driver run (stored on each trial it ran)
    host: str = ""  # $POD_NAME or hostname


def auto_in_flight(threads: int, replicates: int) -> int:
    """Trials in flight that keep ``threads`` busy: about three replicates per thread.

    A trial holds its slot until its last replicate and its aggregation finish, so with
    fewer (1.5 per thread measured 0.87 efficiency at 8 workers, 0.2 s replicates; three,
    0.95-0.98) workers run dry while the driver waits on stragglers (docs/performance.md).
    """
    return max(2, math.ceil(3 * threads / replicates) + 1)


class Calibration:
    """Runs one study's ask/tell loop against a :class:`SimulationService`."""

    def __init__(
        self,
        config: CalibrationConfig,
        service: SimulationService,
        study: optuna.Study,
        metrics: Metrics,
        *,
        progress: ProgressReporter | None = None,
        gather: GatherFunction | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.service = service
        self.study = study
        self.metrics = metrics
        self.progress = progress or ProgressReporter(interactive=False)
        self._gather = gather or (lambda futures, timeout: service.gather(futures, timeout=timeout))
        self._clock = clock
        self._distributions = {
            name: FloatDistribution(spec.low, spec.high, log=spec.log)
            for name, spec in config.parameters.items()
        }
        self._targets = [
            (target, objective.observed.values, objective)
            for target, objective in ((t, make_objective(t)) for t in config.targets)
        ]
        self._weights = {target.name: target.weight for target in config.targets}
        self._loss_params = {name for t in config.targets for name in t.loss_parameters}
        if config.pruning is not None:
            study.pruner = make_pruner(config.pruning)
        self._stream = None
        self._inflight: dict[int, TrialRun] = {}
        self._by_key: dict[str, TrialRun] = {}
        self._stats = RunStats()
        self._counted = 0  # counted trials of the study (all drivers), as last read
        self._tally = Tally()
        # the run's one door to stored trials: its path, retries, storage timing and lease
        self.store = TrialStore(
            study,
            self._distributions,
            run_id=service.run_id,
            lease_interval=config.lease_interval,
            lease_grace=config.lease_grace,
            timer=metrics.storage_time,
        )
        self._stats.run_id, self._stats.host = service.run_id, self.store.host
        self._last_recovery = -math.inf
        self._stop_requested = threading.Event()
        self._stop_reason: str | None = None
        self._grace_deadline: float | None = None
        self._threads = 1
        self._last_refresh = -math.inf
        self._disconnected_since: float | None = None
        self._best_losses: list[float] = []  # the best STORED_FITS losses, ascending
        self._streak = FailureStreak(config.stop_after_failures)
        # results recorded but not yet told, with what to do once told (or not: taken over)
        self._to_tell: list[tuple[Told, Callable[[], None]]] = []

    # -- public -------------------------------------------------------------------------------

    def request_stop(self, reason: str = "signal", *, now: bool = False) -> None:
        """Stop asking; tell what finishes within the grace period, or (``now``) only what has
        finished, re-enqueueing the rest (safe from signal handlers)."""
        if self._stop_requested.is_set() or now:
            self._stop_reason = self._stop_reason or reason
            self._stop_requested.set()
            self._grace_deadline = self._clock()  # a second request: stop now
            return
        self._stop_reason = reason
        self._grace_deadline = self._clock() + self.config.grace_period
        self._stop_requested.set()

    def run(self) -> RunStats:
        """Run until the budget, the time limit or the target loss; returns this run's stats."""
        started = self._clock()
        with self.store.open():
            return self._run(started)

    def _run(self, started: float) -> RunStats:
        self._recover(force=True)
        self._reseed()
        self._count()
        self._init_best()
        paths = self.store.paths()
        self.metrics.set_fast_path(paths["storage"], paths["sampler"])
        log.info(
            "study %s: %d of %d trials already done; mode %s, sampler %s; %s",
            self.config.study,
            self._counted,
            self.config.max_trials,
            self.config.mode,
            self.config.sampler,
            self.store.describe_paths(paths),
        )
        try:
            with self.progress:
                if self.config.mode == "batch":
                    self._run_batches(started)
                else:
                    self._run_streaming(started)
                self._report(force=True, elapsed=self._clock() - started)
        finally:
            self._interrupt_all()
            self.metrics.set_inflight(0)
            self._stats.elapsed = self._stats.elapsed or self._clock() - started
        if self._stop_reason:
            self._stats.stop_reason = self._stop_reason
        return self._stats

    # -- loops --------------------------------------------------------------------------------

    def _run_streaming(self, started: float) -> None:
        stream = self._stream = self.service.stream()
        while True:
            self._refresh_cluster()
            self._recover()
            if self._may_ask(started):
                for run in self._fill():
                    stream.add(run.aggregation_futures)
            if not self._inflight:
                if self._finished():
                    return
                self._wait_for_others()
                continue
            with self._waiting():
                batch = stream.next_batch(timeout=POLL_SECONDS)
            for future, outcome in batch:
                self._record(future.key, outcome)
            self._expire_timed_out()
            self._tell_recorded()
            if self._grace_over():
                return
            self._report()

    def _run_batches(self, started: float) -> None:
        while self._may_ask(started):
            self._refresh_cluster()
            self._recover()
            runs = self._fill()
            if not runs:
                if self._finished():
                    return
                self._wait_for_others()
                continue
            keys = [key for run in runs for key in run.aggregations]
            futures = [f for run in runs for f in run.aggregation_futures]
            with self._waiting():
                outcomes = self._gather(futures, self.config.trial_timeout)
            for key, outcome in zip(keys, outcomes, strict=True):
                self._record(key, outcome)
            self._tell_recorded()
            self._report()

    # -- asking ------------------------------------------------------------------------------

    def _may_ask(self, started: float) -> bool:
        """Whether to try asking (the budget itself is checked before each ask, in _fill)."""
        if self._stop_requested.is_set():
            return False
        if self.config.max_time is not None and self._clock() - started >= self.config.max_time:
            return self._stop("max_time")
        if self.config.target_loss is not None and self._best <= self.config.target_loss:
            return self._stop("target_loss")
        return True

    def _stop(self, reason: str) -> bool:
        self.request_stop(reason)
        if reason in ("max_trials", "target_loss"):
            self._grace_deadline = None  # let what is in flight finish normally
        return False

    def _capacity(self) -> int:
        if self.config.max_in_flight == "auto":
            return auto_in_flight(self._threads, self.config.replicates)
        return int(self.config.max_in_flight)

    @staticmethod
    @contextlib.contextmanager
    def _timed(record: Callable[[float], None]) -> Iterator[None]:
        """Pass the block's wall seconds to ``record``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            record(time.perf_counter() - started)

    def _waiting(self) -> contextlib.AbstractContextManager[None]:
        """Time the loop spends waiting for results (simcal_driver_busy_ratio)."""
        return self._timed(self.metrics.driver_waited)

    def _wait_for_others(self) -> None:
        """Other drivers' trials are still open: wait a poll, then look for stale ones (idle
        here, so every poll; the loop's own check follows ``lease_interval``)."""
        with self._waiting():
            time.sleep(POLL_SECONDS)
        self._recover(force=True)

    def _count(self) -> Tally:
        """Read the study's budget tally (every driver's trials) from storage."""
        self._tally = self.store.tally()
        self._counted = self._tally.counted
        return self._tally

    def _fill(self) -> list[TrialRun]:
        """Ask trials while there is room; the budget is read afresh before each ask, and a
        new trial is run only if fewer than ``max_trials`` trials created before it are or
        will be counted (:meth:`_over_budget`), so drivers asking at once end with exactly
        ``max_trials``."""
        runs = []
        while len(self._inflight) < self._capacity():
            if self._stop_requested.is_set():  # a signal arrived mid-fill: ask no more
                break
            counts = self._count()
            full = counts.committed >= self.config.max_trials
            if full and not counts.waiting:
                break  # asks pop enqueued retries first: those do not add to the total
            # an ask that fails after creating its trial leaves it without an owner: any
            # driver recovers it once ``lease_grace`` has passed
            trial = self.store.ask(waiting=counts.waiting > 0)
            if self._over_budget(trial, full=full):
                # another driver asked (or popped the waiting retry) between our count and
                # our ask: this new trial is over the budget. It never runs, is not counted.
                self.store.tell(trial, state=TrialState.FAIL, what="tell surplus trial",
                                attrs={FAIL_REASON: INTERRUPTED, SURPLUS: True})
                break
            runs.append(self._submit(trial))
        self.metrics.set_inflight(len(self._inflight))
        return runs

    def _over_budget(self, trial: optuna.Trial, *, full: bool) -> bool:
        """Whether a trial just asked must not run: a retry always may (it replaces one the
        budget already holds); a new one may not if the count before the ask was full, nor
        if ``max_trials`` trials created before it are or will be counted. Its number (how
        many trials were created before it) rules the last out cheaply: only a trial numbered
        ``max_trials`` or more costs a second count."""
        if RETRY_OF in trial.user_attrs:
            return False
        if full:
            return True
        if trial.number < self.config.max_trials:
            return False
        return self.store.tally(before=trial).committed >= self.config.max_trials

    def _finished(self) -> bool:
        """Nothing of ours in flight: done once stopping, or once no trial of the study is open
        (another driver's may still finish, or fail over to us when its lease goes stale)."""
        if self._stop_requested.is_set():
            return True
        counts = self._count()
        return counts.committed >= self.config.max_trials and not counts.running + counts.waiting

    def _recover(self, *, force: bool = False) -> None:
        """Every lease interval: re-enqueue the RUNNING trials of drivers whose lease is stale."""
        now = self._clock()
        if not force and now - self._last_recovery < self.config.lease_interval:
            return
        self._last_recovery = now
        recovered = self.store.recover_stale()
        if recovered:
            self._stats.recovered += len(recovered)
            log.info("re-enqueued %d trial(s) a previous driver left running", len(recovered))

    def _submit(self, trial: optuna.Trial) -> TrialRun:
        pruning = self.config.pruning
        count = pruning.min_replicates if pruning else self.config.replicates
        stage = PARTIAL_STAGE if pruning else ""
        replicates, keys, aggregations = self._submit_tasks(trial, [], count, stage)
        run = TrialRun(
            trial=trial,
            started=self._clock(),
            replicates=replicates,
            aggregations=keys,
            futures=replicates + aggregations,
            partial=pruning is not None,
        )
        self._inflight[trial.number] = run
        for key in run.aggregations:
            self._by_key[key] = run
        return run

    def _submit_tasks(
        self, trial: optuna.Trial, earlier: list[Future], count: int, stage: str
    ) -> tuple[list[Future], dict[str, str], list[Future]]:
        """Submit ``count`` more replicates after ``earlier`` and every target's aggregation."""
        trial_id = str(trial.number)
        replicates = earlier + self.service.submit_replicates(
            self.config.model,
            {k: v for k, v in trial.params.items() if k not in self._loss_params},
            count,
            self.config.seed,
            trial_id=trial_id,
            model_options=self.config.model_options,
            first=len(earlier),
        )
        aggregations = [
            self.service.submit_aggregation(
                replicates,
                target,
                trial_id=trial_id,
                observed=observed,
                loss=loss.bind(trial.params),
                stage=stage,
            )
            for target, observed, loss in self._targets
        ]
        keys = {f.key: t.name for f, (t, _, _) in zip(aggregations, self._targets, strict=True)}
        return replicates, keys, aggregations

    # -- pruning ------------------------------------------------------------------------------

    def _judge(self, run: TrialRun) -> None:
        """A partial trial's first replicates are in: prune it, or submit the rest."""
        losses = [run.losses[name] for name in run.aggregations.values()]
        partial = sum(self._weights[item.target] * item.loss for item in losses)
        step = len(run.replicates)
        if not self.store.prune(run.trial, partial, step):
            for key in run.aggregations:
                self._by_key.pop(key, None)
            remaining = self.config.replicates - step
            replicates, keys, aggregations = self._submit_tasks(
                run.trial, run.replicates, remaining, ""
            )
            run.replicates, run.aggregations, run.losses, run.partial = replicates, keys, {}, False
            run.futures = replicates + aggregations
            for key in keys:
                self._by_key[key] = run
            self._stream.add(aggregations)
            return
        seconds = self._release(run)
        attrs: dict[str, object] = {f"partial_loss_{item.target}": item.loss for item in losses}
        attrs["pruned_at_replicates"] = step
        attrs[DURATION] = round(seconds, 4)
        attrs["task_seconds"] = round(
            losses[0].replicate_seconds + sum(i.aggregation_seconds for i in losses), 4
        )
        def told() -> None:
            self._streak.succeeded()
            self._stats.pruned += 1
            self.metrics.trial_pruned(seconds)

        self._tell(Told(run.trial, state=TrialState.PRUNED, attrs=attrs), told)

    # -- telling ------------------------------------------------------------------------------

    def _record(self, key: str, outcome: object) -> None:
        run = self._by_key.get(key)
        if run is None:
            return  # a trial already told (failed early, timed out or interrupted)
        if isinstance(outcome, BaseException):
            if classify(outcome) is FailureReason.CANCELLED:
                if lost_with_the_scheduler(outcome) or not self._connected():
                    raise SchedulerLostError("lost the connection to the Dask scheduler")
                outcome = self._replicate_error(run) or outcome
            self._fail(run, outcome)
            return
        assert isinstance(outcome, TargetLoss), f"unexpected aggregation result {outcome!r}"
        run.losses[outcome.target] = outcome
        if len(run.losses) == len(run.aggregations):
            if run.partial:
                self._judge(run)
            else:
                self._complete(run)

    def _replicate_error(self, run: TrialRun) -> BaseException | None:
        """Why an aggregation was cancelled: Dask cancels it when a replicate it depends on
        erred on the scheduler (e.g. a task graph it cannot unpickle: ``model_import``)."""
        erred = [f for f in run.replicates if f.status == "error"]
        errors = [o for o in self.service.gather(erred[:1]) if isinstance(o, BaseException)]
        return errors[0] if errors else None

    def _release(self, run: TrialRun) -> float:
        self._inflight.pop(run.trial.number, None)
        for key in run.aggregations:
            self._by_key.pop(key, None)
        self.metrics.set_inflight(len(self._inflight))
        return self._clock() - run.started

    def _complete(self, run: TrialRun) -> None:
        seconds = self._release(run)
        losses = [run.losses[name] for name in run.aggregations.values()]
        total = sum(self._weights[item.target] * item.loss for item in losses)
        task_seconds = losses[0].replicate_seconds + sum(i.aggregation_seconds for i in losses)
        attrs: dict[str, object] = {f"loss_{item.target}": item.loss for item in losses}
        attrs[DURATION] = round(seconds, 4)
        attrs["task_seconds"] = round(task_seconds, 4)
        improved = total < self._best
        if self._among_best(total):  # what the report's fit figure shows (docs/architecture.md)
            attrs.update({f"{FIT_ATTR_PREFIX}{i.target}": i.summary for i in losses if i.summary})
        def told() -> None:
            self._streak.succeeded()
            self._stats.completed += 1
            if improved:
                self.metrics.set_best_loss(total)
            self.metrics.trial_completed(total, seconds)

        self._tell(Told(run.trial, total, attrs=attrs), told)

    def _fail(self, run: TrialRun, error: BaseException) -> None:
        seconds = self._release(run)
        self.service.cancel(run.futures)
        reason = classify(error)
        attrs = {FAIL_REASON: reason.value, ERROR: full_text(error), DURATION: round(seconds, 4)}
        def told() -> None:
            self._stats.failed += 1
            self._stats.errors[reason.value] = self._stats.errors.get(reason.value, 0) + 1
            self.metrics.trial_failed(reason, seconds)
            log.warning("trial %d failed (%s): %s", run.trial.number, reason.value, describe(error))
            cause = self._streak.failed(reason, describe(error))
            if cause and not self._stop_requested.is_set():  # stop now: they would fail alike
                self.request_stop(cause, now=True)

        self._tell(Told(run.trial, state=TrialState.FAIL, attrs=attrs), told)

    def _tell(self, result: Told, then: Callable[[], None]) -> None:
        """Queue a finished trial's tell; :meth:`_tell_recorded` tells the batch at once."""
        self._to_tell.append((result, then))

    def _tell_recorded(self) -> None:
        """Tell every queued result in one transaction (a group commit per batch of results);
        then count each one told, and drop each one another driver had taken over."""
        queued, self._to_tell = self._to_tell, []
        if not queued:
            return
        told = self.store.tell_many([result for result, _ in queued])
        for ok, (_, then) in zip(told, queued, strict=True):
            if ok:
                self._counted += 1
                then()
            else:
                self._stats.taken_over += 1

    def _expire_timed_out(self) -> None:
        now = self._clock()
        expired = [
            r for r in self._inflight.values() if now - r.started > self.config.trial_timeout
        ]
        for run in expired:
            self._fail(
                run, TimeoutError(f"trial exceeded trial_timeout={self.config.trial_timeout}s")
            )
        if expired:
            self.service.restart_stuck_workers([f for run in expired for f in run.replicates])

    def _interrupt_all(self) -> None:
        """Tell what has finished, then every trial still in flight as interrupted and enqueue
        its parameters again."""
        queued = len(self._to_tell)
        try:
            self._tell_recorded()
        except Exception as exc:  # their trials stay RUNNING: re-run once our lease is gone
            log.error("could not tell %d finished trial(s): %s", queued, exc)
        runs = list(self._inflight.values())
        for run in runs:
            self._release(run)
            try:
                self.service.cancel(run.futures)
            except Exception as exc:  # the scheduler may be gone; storage matters more
                log.debug("cancel failed: %s", exc)
            if self.store.requeue(run.trial):
                self._stats.interrupted += 1
        if runs:
            log.info("re-enqueued %d unfinished trial(s) for the next run", len(runs))

    # -- housekeeping --------------------------------------------------------------------------

    def _grace_over(self) -> bool:
        return self._grace_deadline is not None and self._clock() >= self._grace_deadline

    def _connected(self) -> bool:
        return self.service.client.status == "running"

    def _refresh_cluster(self) -> None:
        now = self._clock()
        if not self._connected():
            self._disconnected_since = self._disconnected_since or now
            if now - self._disconnected_since > SCHEDULER_LOSS_SECONDS:
                raise SchedulerLostError(
                    f"lost the Dask scheduler for more than {SCHEDULER_LOSS_SECONDS:.0f}s"
                )
            return
        self._disconnected_since = None
        if now - self._last_refresh < CLUSTER_REFRESH_SECONDS:
            return
        self._last_refresh = now
        cluster = self.service.cluster_snapshot()
        self._threads = max(cluster.threads, 1)
        self.metrics.observe_cluster(cluster.workers, cluster.threads, cluster.busy_threads)

    def _among_best(self, loss: float) -> bool:
        """Whether ``loss`` is among the best :data:`STORED_FITS` so far (and remember it)."""
        if len(self._best_losses) >= STORED_FITS and loss >= self._best_losses[-1]:
            return False
        bisect.insort(self._best_losses, loss)
        del self._best_losses[STORED_FITS:]
        return True

    @property
    def _best(self) -> float:
        return self._best_losses[0] if self._best_losses else math.inf

    def _reseed(self) -> None:
        """A resumed study gets a seed of its own (same seed: the first run's points again)."""
        stored = self.store.stored_count()
        if stored:
            seed = run_seed(self.config.seed, stored)
            self.study.sampler = make_sampler(self.config.sampler, seed)
            log.debug("sampler seed %d (%d trials stored)", seed, stored)

    def _init_best(self) -> None:
        self._best_losses = self.store.best_values(STORED_FITS)
        if self._best_losses:
            self.metrics.set_best_loss(self._best)

    def _report(self, *, force: bool = False, elapsed: float = 0.0) -> None:
        if force:  # the last line and the summary rate the same window: this whole run
            self._stats.elapsed = elapsed
        self.progress.update(
            Snapshot(
                done=self._counted,
                total=self.config.max_trials,
                failed=self._stats.failed,
                inflight=len(self._inflight),
                best_loss=self._best,
                completed_this_run=self._stats.completed,
                elapsed=elapsed,
            ),
            force=force,
        )
