"""The calibration loop: ask the optimizer for trials, run them, tell every one.

Streaming mode keeps enough trials in flight to keep every worker thread busy and
tells each trial as soon as its aggregations finish; batch mode (ask a batch,
one gather, tell all) exists for comparison. A trial's failure is told as a failed
trial with its reason; no asked trial is ever left untold. Nothing here touches
Dask futures beyond handing them back to :class:`SimulationService`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import optuna
from distributed import Future
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from simcal.config import CalibrationConfig
from simcal.failures import FailureReason, classify, describe, full_text
from simcal.metrics import Metrics
from simcal.progress import ProgressReporter, Snapshot
from simcal.samplers import make_sampler, run_seed, trial_id
from simcal.service import SimulationService
from simcal.storage import (
    FAIL_REASON,
    counted_trials,
    recover_interrupted,
    requeue,
    retry_params,
    tell,
    with_retries,
)
from simcal.targets import load_observed, loss_function
from simcal.tasks import TargetLoss

log = logging.getLogger(__name__)

GatherFunction = Callable[[Sequence[Future], float | None], list[object | BaseException]]
POLL_SECONDS = 0.5
CLUSTER_REFRESH_SECONDS = 2.0
SCHEDULER_LOSS_SECONDS = 30.0


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

    @property
    def aggregation_futures(self) -> list[Future]:
        return [f for f in self.futures if f.key in self.aggregations]


@dataclass
class RunStats:
    """What this driver run did."""

    completed: int = 0
    failed: int = 0
    interrupted: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    stop_reason: str = "max_trials"
    elapsed: float = 0.0


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
            (target, load_observed(target), loss_function(target.loss)) for target in config.targets
        ]
        self._inflight: dict[int, TrialRun] = {}
        self._by_key: dict[str, TrialRun] = {}
        self._stats = RunStats()
        self._counted = 0
        self._stop_requested = threading.Event()
        self._stop_reason: str | None = None
        self._grace_deadline: float | None = None
        self._threads = 1
        self._last_refresh = -math.inf
        self._disconnected_since: float | None = None
        self._best = math.inf

    # -- public -------------------------------------------------------------------------------

    def request_stop(self, reason: str = "signal") -> None:
        """Stop asking; tell what finishes within the grace period (safe from signal handlers)."""
        if self._stop_requested.is_set():
            self._grace_deadline = self._clock()  # a second request: stop now
            return
        self._stop_reason = reason
        self._grace_deadline = self._clock() + self.config.grace_period
        self._stop_requested.set()

    def run(self) -> RunStats:
        """Run until the budget, the time limit or the target loss; returns this run's stats."""
        started = self._clock()
        recovered = with_retries(
            lambda: recover_interrupted(self.study, self._distributions), what="resume"
        )
        if recovered:
            log.info("re-enqueued %d trial(s) a previous driver left running", len(recovered))
        self._reseed()
        self._counted = with_retries(lambda: counted_trials(self.study), what="count trials")
        self._init_best()
        log.info(
            "study %s: %d of %d trials already done; mode %s, sampler %s",
            self.config.study,
            self._counted,
            self.config.max_trials,
            self.config.mode,
            self.config.sampler,
        )
        try:
            with self.progress:
                if self.config.mode == "batch":
                    self._run_batches(started)
                else:
                    self._run_streaming(started)
                self._report(force=True)
        finally:
            self._interrupt_all()
            self.metrics.set_inflight(0)
            self._stats.elapsed = self._clock() - started
        if self._stop_reason:
            self._stats.stop_reason = self._stop_reason
        return self._stats

    # -- loops --------------------------------------------------------------------------------

    def _run_streaming(self, started: float) -> None:
        stream = self.service.stream()
        while True:
            self._refresh_cluster()
            if self._may_ask(started):
                for run in self._fill():
                    stream.add(run.aggregation_futures)
            if not self._inflight:
                return
            for future, outcome in stream.next_batch(timeout=POLL_SECONDS):
                self._record(future.key, outcome)
            self._expire_timed_out()
            if self._grace_over():
                return
            self._report()

    def _run_batches(self, started: float) -> None:
        while self._may_ask(started):
            self._refresh_cluster()
            runs = self._fill()
            if not runs:
                return
            keys = [key for run in runs for key in run.aggregations]
            futures = [f for run in runs for f in run.aggregation_futures]
            outcomes = self._gather(futures, self.config.trial_timeout)
            for key, outcome in zip(keys, outcomes, strict=True):
                self._record(key, outcome)
            self._report()

    # -- asking ------------------------------------------------------------------------------

    def _may_ask(self, started: float) -> bool:
        if self._stop_requested.is_set():
            return False
        if self._counted + len(self._inflight) >= self.config.max_trials:
            return bool(self._inflight) or self._stop("max_trials")
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

    def _fill(self) -> list[TrialRun]:
        budget = self.config.max_trials - self._counted - len(self._inflight)
        wanted = min(self._capacity() - len(self._inflight), budget)
        runs = []
        for _ in range(max(wanted, 0)):
            if self._stop_requested.is_set():  # a signal arrived mid-fill: ask no more
                break
            runs.append(self._submit(self._ask()))
        self.metrics.set_inflight(len(self._inflight))
        return runs

    def _ask(self) -> optuna.Trial:
        failed_attempts = 0

        def ask() -> optuna.Trial:
            nonlocal failed_attempts
            try:
                return self.study.ask(self._distributions)
            except Exception:
                failed_attempts += 1
                raise

        trial = with_retries(ask, what="ask")
        if failed_attempts:  # a failed ask may have created a trial before the database failed
            with_retries(lambda: self._tell_orphans(trial.number), what="ask")
        with_retries(lambda: trial.set_user_attr("run_id", self.service.run_id), what="ask")
        return trial

    def _tell_orphans(self, asked: int) -> None:
        """Tell the trials a failed ``ask`` left RUNNING as interrupted (not counted)."""
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number == asked or frozen.number in self._inflight:
                continue
            log.info("trial %d was left running by a failed ask; telling it", frozen.number)
            params = retry_params(frozen, self._distributions)  # e.g. a popped retry
            requeue(self.study, frozen.number, trial_id(frozen), params)

    def _submit(self, trial: optuna.Trial) -> TrialRun:
        trial_id = str(trial.number)
        replicates = self.service.submit_replicates(
            self.config.model,
            trial.params,
            self.config.replicates,
            self.config.seed,
            trial_id=trial_id,
            model_options=self.config.model_options,
        )
        aggregations = [
            self.service.submit_aggregation(
                replicates, target, trial_id=trial_id, observed=observed, loss=loss
            )
            for target, observed, loss in self._targets
        ]
        run = TrialRun(
            trial=trial,
            started=self._clock(),
            replicates=replicates,
            aggregations={
                f.key: t.name for f, (t, _, _) in zip(aggregations, self._targets, strict=True)
            },
            futures=replicates + aggregations,
        )
        self._inflight[trial.number] = run
        for key in run.aggregations:
            self._by_key[key] = run
        return run

    # -- telling ------------------------------------------------------------------------------

    def _record(self, key: str, outcome: object) -> None:
        run = self._by_key.get(key)
        if run is None:
            return  # a trial already told (failed early, timed out or interrupted)
        if isinstance(outcome, BaseException):
            if classify(outcome) is FailureReason.CANCELLED and not self._connected():
                raise SchedulerLostError("lost the connection to the Dask scheduler")
            self._fail(run, outcome)
            return
        assert isinstance(outcome, TargetLoss), f"unexpected aggregation result {outcome!r}"
        run.losses[outcome.target] = outcome
        if len(run.losses) == len(run.aggregations):
            self._complete(run)

    def _release(self, run: TrialRun) -> float:
        self._inflight.pop(run.trial.number, None)
        for key in run.aggregations:
            self._by_key.pop(key, None)
        self.metrics.set_inflight(len(self._inflight))
        return self._clock() - run.started

    def _complete(self, run: TrialRun) -> None:
        seconds = self._release(run)
        losses = [run.losses[name] for name in run.aggregations.values()]
        total = sum(item.loss for item in losses)
        task_seconds = losses[0].replicate_seconds + sum(i.aggregation_seconds for i in losses)
        attrs = {f"loss_{item.target}": item.loss for item in losses}
        attrs["duration_seconds"] = round(seconds, 4)
        attrs["task_seconds"] = round(task_seconds, 4)
        with_retries(lambda: self._set_attrs(run.trial, attrs), what="tell")
        tell(self.study, run.trial, total, what="tell")
        self._counted += 1
        self._stats.completed += 1
        self._best = min(self._best, total)
        self.metrics.trial_completed(total, seconds)

    def _fail(self, run: TrialRun, error: BaseException) -> None:
        seconds = self._release(run)
        self.service.cancel(run.futures)
        reason = classify(error)
        attrs = {
            FAIL_REASON: reason.value,
            "error": full_text(error),  # the log line below has the first line
            "duration_seconds": round(seconds, 4),
        }
        with_retries(lambda: self._set_attrs(run.trial, attrs), what="tell failed trial")
        tell(self.study, run.trial, state=TrialState.FAIL, what="tell failed trial")
        self._counted += 1
        self._stats.failed += 1
        self._stats.errors[reason.value] = self._stats.errors.get(reason.value, 0) + 1
        self.metrics.trial_failed(reason, seconds)
        log.warning("trial %d failed (%s): %s", run.trial.number, reason.value, describe(error))

    @staticmethod
    def _set_attrs(trial: optuna.Trial, attrs: dict[str, object]) -> None:
        for key, value in attrs.items():  # idempotent: safe to retry as a whole
            trial.set_user_attr(key, value)

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
        """Tell every trial still in flight as interrupted and enqueue its parameters again."""
        runs = list(self._inflight.values())
        for run in runs:
            self._release(run)
            try:
                self.service.cancel(run.futures)
            except Exception as exc:  # the scheduler may be gone; storage matters more
                log.debug("cancel failed: %s", exc)
            with_retries(
                lambda run=run: requeue(
                    self.study, run.trial.number, trial_id(run.trial), run.trial.params
                ),
                what="re-enqueue interrupted trial",
            )
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
        self.metrics.refresh()

    def _reseed(self) -> None:
        """A resumed study gets a seed of its own (same seed: the first run's points again)."""
        stored = with_retries(lambda: len(self.study.get_trials(deepcopy=False)), what="resume")
        if stored:
            seed = run_seed(self.config.seed, stored)
            self.study.sampler = make_sampler(self.config.sampler, seed)
            log.debug("sampler seed %d (%d trials stored)", seed, stored)

    def _init_best(self) -> None:
        try:
            self._best = float(self.study.best_value)
        except ValueError:
            return  # no completed trial yet
        self.metrics.set_best_loss(self._best)

    def _report(self, *, force: bool = False) -> None:
        self.metrics.refresh()
        self.progress.update(
            Snapshot(
                done=self._counted,
                total=self.config.max_trials,
                failed=self._stats.failed,
                inflight=len(self._inflight),
                trials_per_minute=self.metrics.value("simcal_trials_per_minute"),
                best_loss=self._best,
            ),
            force=force,
        )
