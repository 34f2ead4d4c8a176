"""The stored-trial lifecycle and its one front door, :class:`TrialStore` (kept here with the
RDB and public paths it chooses between, which this module's functions share).

A driver run reaches stored trials only through its :class:`TrialStore`: built once per run,
it picks the RDB path (:mod:`simcal.optuna_internals`) or Optuna's public one when built, and
owns retries (:func:`with_retries`) and storage timing for every operation. The functions
below (:func:`tell`, :func:`tally`, :func:`requeue`, :func:`recover_stale`...) serve the
tests, ``simcal results`` and tools that hold a study but no run.

A trial's owner, its tell, and recovery of a dead driver's trials:

Several drivers may run one study on one storage at once. Each driver holds a *lease*: a
study system attribute ``simcal:lease:<run_id>`` that a background thread renews every
``interval`` seconds by writing a renewal counter one higher. Every trial a driver asks
carries its ``run_id`` (and host or ``$POD_NAME``) as user attributes. A RUNNING trial whose
lease another driver has seen unchanged for ``grace`` seconds of its own monotonic clock (or
that was released without telling it) belongs to a dead driver; no two hosts' clocks are
ever compared (:class:`LeaseObserver`). Any live driver claims such a trial (tells it
failed as ``interrupted``, which only one claimant can do) and enqueues its parameters
again. A driver never claims the trials of a live lease, and a driver that finds its own
trial already told ("someone else told it") drops its result instead of crashing.

On the RDB path asking writes the trial's parameters and owner in one transaction, telling
its user attributes and state in one (the private Optuna calls that takes live in
:mod:`simcal.optuna_internals`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from simcal import optuna_internals as internals
from simcal.storage import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Stored-trial user attributes (names are a contract: `simcal results`, tests, dashboards).
FAIL_REASON = "fail_reason"
INTERRUPTED = "interrupted"
# an interrupted trial that never ran: asked over the budget when another driver popped the
# waiting retry it was meant to run (not counted, nothing to retry)
SURPLUS = "surplus"
RETRY_OF = "retry_of"
RUN_ID = "run_id"  # the driver run that asked the trial
HOST = "host"  # that driver's $POD_NAME on Kubernetes, else its hostname
ERROR = "error"
DURATION = "duration_seconds"
LEASE_PREFIX = "simcal:lease:"  # study system attribute per driver run

DEFAULT_LEASE_INTERVAL = 5.0
DEFAULT_LEASE_GRACE = 30.0


def driver_host() -> str:
    """Where this driver runs: ``$POD_NAME`` on Kubernetes, else the hostname."""
    return os.environ.get("POD_NAME") or socket.gethostname()


# -- retries ---------------------------------------------------------------------------------


def _transient(error: BaseException | None) -> BaseException | None:
    """The database error behind ``error`` if retrying may help (lock, lost connection).

    Optuna wraps the SQLAlchemy errors raised inside its sessions in ``StorageInternalError``;
    a query after a dropped connection raises ``PendingRollbackError`` (Optuna rolls back).
    """
    if isinstance(error, optuna.exceptions.StorageInternalError):
        return _transient(error.__cause__)
    if isinstance(error, sqlalchemy.exc.PendingRollbackError):
        return _transient(error.__cause__ or error.__context__) or error
    if isinstance(error, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return error
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
        return error
    return None


def _reason(error: BaseException) -> str:
    """The database driver's one-line reason (no URL in it, so no password)."""
    orig = getattr(error, "orig", None) or error
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0][:200]}" if lines else type(orig).__name__


def with_retries(
    operation: Callable[[], T],
    *,
    what: str,
    attempts: int = 8,
    first_delay: float = 0.2,
    max_delay: float = 10.0,
) -> T:
    """Run a storage operation, retrying transient database errors with exponential backoff.

    With the defaults the attempts span about 25 s of waiting (plus each attempt's own
    timeouts): enough for a locked SQLite file or a restarting PostgreSQL server.
    """
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            error = _transient(exc)
            if error is None:
                raise
            if attempt == attempts:
                raise StorageError(
                    f"{what} failed after {attempts} attempts: {_reason(error)}"
                ) from None
            log.warning("%s failed (%s); retrying in %.1fs", what, _reason(error), delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")


# -- what is stored and counted ------------------------------------------------------------------


@dataclass(frozen=True)
class Told:
    """One trial's result for :func:`tell_many`."""

    trial: optuna.Trial | FrozenTrial
    value: float | None = None
    state: TrialState = TrialState.COMPLETE
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tally:
    """The study's trials as the budget sees them, across every driver."""

    counted: int = 0
    running: int = 0  # asked, not told (any driver's, dead or alive)
    waiting: int = 0  # enqueued, not asked yet

    @property
    def committed(self) -> int:
        """Trials that are or will be counted once every live driver has finished."""
        return self.counted + self.running + self.waiting


def counted(trial: FrozenTrial) -> bool:
    """Whether a trial counts towards ``max_trials``: finished (completed, pruned, or failed
    for a reason of its own), and not as ``interrupted``."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get(FAIL_REASON) != INTERRUPTED


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``max_trials`` (:func:`counted`)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if counted(t))


def _final(
    trial: optuna.Trial | FrozenTrial, value: float | None, state: TrialState
) -> tuple[list[float] | None, TrialState]:
    """The values and state Optuna's tell would store."""
    if state == TrialState.PRUNED and value is None:  # as Optuna's tell: the last reported value
        value = internals.last_reported(trial)
    values = None if value is None else [value]
    if values is not None and not all(math.isfinite(v) for v in values):
        return None, TrialState.FAIL  # Optuna tells a NaN loss as failed, too
    return values, state


def _told_by_us(
    study: optuna.Study, trial: optuna.Trial | FrozenTrial, attrs: Mapping[str, Any]
) -> bool:
    """After a retried tell met a finished trial: whether it holds our attributes."""
    stored = internals.stored_trial(study, internals.trial_id(trial))
    return all(json.dumps(stored.user_attrs.get(k)) == json.dumps(v) for k, v in attrs.items())


def _check_values(results: list[Told]) -> None:
    for result in results:
        if result.state == TrialState.COMPLETE and result.value is None:
            raise ValueError("a completed trial needs a value")


def _warn_taken(results: list[Told], told: list[bool]) -> None:
    for ok, result in zip(told, results, strict=True):
        if not ok and dict(result.attrs) != {FAIL_REASON: INTERRUPTED}:
            log.warning(
                "trial %d was already told by another driver (it judged this one dead); "
                "dropping this result",
                result.trial.number,
            )


# -- the two storage paths: chosen once per study ----------------------------------------------


class _PublicTrials:
    """Stored trials through Optuna's public API: storages other than RDB, an unverified
    Optuna. The base of :class:`_RdbTrials`, which overrides what it does faster."""

    fast = False

    def view(self, study: optuna.Study, seconds: float) -> contextlib.AbstractContextManager:
        """The driver's view of the study (:meth:`TrialStore.view`): Optuna's own here."""
        return contextlib.nullcontext(None)

    def read_fresh(self, study: optuna.Study) -> None:
        """Optuna's cached storage reads other drivers' trials on every read already."""

    def ask(
        self,
        study: optuna.Study,
        distributions: Mapping[str, Any],
        owner: Mapping[str, Any],
        *,
        waiting: bool,
    ) -> optuna.Trial:
        trial = study.ask(dict(distributions))
        for key, value in owner.items():
            trial.set_user_attr(key, value)
        return trial

    def tell_many(self, study: optuna.Study, results: list[Told], what: str) -> list[bool]:
        """Each trial told on its own, attributes then state; a retry that meets the trial
        finished with our attributes means the attempt before it committed."""
        _check_values(results)
        return [self._tell_one(study, result, what) for result in results]

    def _tell_one(self, study: optuna.Study, result: Told, what: str) -> bool:
        trial, attrs, state = result.trial, dict(result.attrs), result.state
        attempts = 0

        def once() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                for key, item in attrs.items():
                    internals.set_trial_user_attr(study, internals.trial_id(trial), key, item)
                study.tell(
                    trial.number,
                    result.value,
                    state=None if state == TrialState.COMPLETE else state,
                )
            except optuna.exceptions.UpdateFinishedTrialError:
                if attempts > 1 and _told_by_us(study, trial, attrs):
                    return True
                _warn_taken([result], [False])
                return False
            return True

        return with_retries(once, what=what)

    def tally(self, study: optuna.Study, below: int | None = None) -> Tally:
        """A scan of the study's trials (``below``: those whose id is lower)."""
        done = running = waiting = 0
        for trial in study.get_trials(deepcopy=False):
            if below is not None and internals.trial_id(trial) >= below:
                continue
            if trial.state == TrialState.RUNNING:
                running += 1
            elif trial.state == TrialState.WAITING:
                waiting += 1
            elif counted(trial):
                done += 1
        return Tally(done, running, waiting)

    def stale(
        self, study: optuna.Study, own_run_id: str, grace: float, observer: LeaseObserver
    ) -> list[FrozenTrial]:
        trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return _stale_among(study, trials, own_run_id, grace, observer)


class _RdbTrials(_PublicTrials):
    """Stored trials on RDB storage through :mod:`simcal.optuna_internals`: an ask writes its
    parameters and owner in one transaction, a batch of tells is one transaction, the budget
    is one grouped ``COUNT``, the RUNNING trials' owners one light query."""

    fast = True

    def view(self, study: optuna.Study, seconds: float) -> contextlib.AbstractContextManager:
        return internals.driver_storage(study, seconds)

    def read_fresh(self, study: optuna.Study) -> None:
        internals.read_fresh(study)

    def ask(
        self,
        study: optuna.Study,
        distributions: Mapping[str, Any],
        owner: Mapping[str, Any],
        *,
        waiting: bool,
    ) -> optuna.Trial:
        return internals.ask(study, distributions, owner, waiting=waiting)

    def tell_many(self, study: optuna.Study, results: list[Told], what: str) -> list[bool]:
        _check_values(results)
        finals = [
            (result.trial, *_final(result.trial, result.value, result.state), dict(result.attrs))
            for result in results
        ]
        attempts = 0

        def once() -> list[bool]:
            nonlocal attempts
            attempts += 1
            written = internals.write_finals(study, finals)
            if attempts > 1:  # an attempt before may have committed, then lost its connection
                written = [
                    ok or _told_by_us(study, trial, attrs)
                    for ok, (trial, _, _, attrs) in zip(written, finals, strict=True)
                ]
            return written

        written = with_retries(once, what=what)
        _warn_taken(results, written)
        return written

    def tally(self, study: optuna.Study, below: int | None = None) -> Tally:
        by_state, interrupted = internals.count_trials(
            study, FAIL_REASON, INTERRUPTED, below=below
        )
        finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        done = sum(by_state.get(state, 0) for state in finished) - interrupted
        running, waiting = by_state.get(TrialState.RUNNING, 0), by_state.get(TrialState.WAITING, 0)
        return Tally(done, running, waiting)

    def stale(
        self, study: optuna.Study, own_run_id: str, grace: float, observer: LeaseObserver
    ) -> list[FrozenTrial]:
        """The RUNNING trials and their owners read from the database in one light query
        (never from a cached view); only the stale ones are loaded in full."""
        owners = internals.running_owners(study, RUN_ID)
        leases = _leases(study) if owners else {}
        dead = [
            tid
            for tid, _, owner in owners
            if _dead(observer, tid, owner, own_run_id, leases, grace)
        ]
        _forget(observer, [tid for tid, _, _ in owners], leases)
        return [internals.stored_trial(study, tid) for tid in dead]


_PUBLIC, _RDB = _PublicTrials(), _RdbTrials()


def _path(study: optuna.Study) -> _PublicTrials:
    """The storage path for ``study``: the one choice of RDB or public path (per call for the
    functions below; once per run for :class:`TrialStore`)."""
    return _RDB if internals.rdb(study) is not None else _PUBLIC


def tell(
    study: optuna.Study,
    trial: optuna.Trial | FrozenTrial,
    value: float | None = None,
    *,
    state: TrialState = TrialState.COMPLETE,
    attrs: Mapping[str, Any] | None = None,
    what: str = "tell",
) -> bool:
    """Tell a trial (attributes and state in one transaction), retrying transient errors.

    Returns False when another driver told the trial first (it judged this driver dead and
    claimed the trial): the caller drops its result, which the claimant re-runs. A retry
    that finds the trial finished with our attributes means the attempt before it committed
    and then lost its connection before hearing so: told by us.
    """
    return tell_many(study, [Told(trial, value, state, dict(attrs or {}))], what=what)[0]


def tell_many(study: optuna.Study, results: list[Told], *, what: str = "tell") -> list[bool]:
    """Tell several trials in one transaction (a group commit on RDB storage), retrying
    transient errors; as :func:`tell` for each: False when another driver told it first.
    Every returned True is committed."""
    if not results:
        return []
    return _path(study).tell_many(study, results, what)


def tally(study: optuna.Study) -> Tally:
    """Count the study's trials for the budget: one grouped COUNT query on RDB storage, so
    asking it before every ask stays cheap; a scan of the trials on other storages."""
    return _path(study).tally(study)


# -- interrupting and re-enqueuing ---------------------------------------------------------------


def requeue(
    study: optuna.Study, trial: FrozenTrial | optuna.Trial, names: Collection[str] = ()
) -> bool:
    """Claim a RUNNING trial as ``interrupted`` (failed, not counted) and enqueue its parameters
    again, retrying transient errors; False if another driver finished it first (only one
    claimant wins). A trial killed before its parameters were stored has nothing to retry.

    The claim comes first, so two drivers never both enqueue it. A driver killed between the
    two commits leaves an interrupted trial without a retry: not counted, so the budget asks a
    fresh trial instead; nothing counted is lost.
    """
    return _requeue(_path(study), study, trial, names)


def _requeue(
    path: _PublicTrials,
    study: optuna.Study,
    trial: FrozenTrial | optuna.Trial,
    names: Collection[str],
) -> bool:
    claim = Told(trial, state=TrialState.FAIL, attrs={FAIL_REASON: INTERRUPTED})
    if not path.tell_many(study, [claim], "interrupt trial")[0]:
        return False
    # a popped retry killed before its suggest still has its parameters as fixed_params
    system_attrs = getattr(trial, "system_attrs", None) or {}
    params = {**system_attrs.get("fixed_params", {}), **trial.params}
    if not set(names) <= params.keys():  # killed mid-ask: never submitted, nothing ran
        params = {}
    if params:
        with_retries(
            lambda: study.enqueue_trial(params, user_attrs={RETRY_OF: trial.number}),
            what="re-enqueue trial",
        )
    return True


# -- leases: which drivers are alive ------------------------------------------------------------


class DriverLease:
    """This driver's lease on a study, renewed by a daemon thread until :meth:`release`.

    Each renewal writes a counter one higher (``renewals``); observers age the lease by how
    long they have seen the counter unchanged on their own monotonic clock
    (:class:`LeaseObserver`), so no driver's wall clock is compared with another's. The
    wall time written beside it (``renewed``) is for people reading the study."""

    def __init__(
        self,
        study: optuna.Study,
        run_id: str,
        *,
        interval: float = DEFAULT_LEASE_INTERVAL,
        host: str | None = None,
    ) -> None:
        self.study = study
        self.run_id = run_id
        self.host = host or driver_host()
        self.interval = interval
        self._renewals = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        return LEASE_PREFIX + self.run_id

    def renew(self, *, released: bool = False) -> None:
        self._renewals += 1
        value = {
            "renewals": self._renewals,
            "renewed": time.time(),
            "host": self.host,
            "released": released,
        }
        internals.set_study_system_attr(self.study, self.key, value)

    def start(self) -> None:
        """Write the lease now (so nobody mistakes our first trials for orphans), then renew it."""
        with_retries(self.renew, what="write driver lease")
        self._thread = threading.Thread(target=self._loop, name="simcal-lease", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.renew()
            except Exception as exc:  # the loop's own storage calls report and retry
                log.warning("could not renew the driver lease: %s", _reason(exc))

    def release(self) -> None:
        """Stop renewing and mark the lease released (all our trials are told by then)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 30)
        try:
            with_retries(lambda: self.renew(released=True), what="release driver lease", attempts=3)
        except Exception as exc:  # a stale lease does the same job, only later
            log.warning("could not release the driver lease: %s", exc)


class LeaseObserver:
    """Ages other drivers' leases on this process's own monotonic clock.

    The rule of Kubernetes leader election (``observedTime``): a lease is as old as the time
    this observer has seen it unchanged, whatever clocks the drivers' hosts (or, on SQLite,
    the database, which runs in each driver's process) keep. A lease first seen now is
    fresh, so an observer judges a driver dead only after watching it for ``grace``; a
    RUNNING trial without an owner likewise, from when this observer first saw it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[object, tuple[object, float]] = {}

    def unchanged_for(self, key: object, marker: object) -> float:
        """Seconds this observer has seen ``key`` with this ``marker`` (0 when it changed)."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is None or seen[0] != marker:
            self._seen[key] = (marker, now)
            return 0.0
        return now - seen[1]

    def forget_except(self, keys: Collection[object]) -> None:
        """Drop what is no longer there (told trials), so memory stays bounded."""
        self._seen = {k: v for k, v in self._seen.items() if k in keys}


def _leases(study: optuna.Study) -> dict[str, Mapping[str, Any]]:
    attrs = internals.study_system_attrs(study)
    return {
        key.removeprefix(LEASE_PREFIX): value
        for key, value in attrs.items()
        if key.startswith(LEASE_PREFIX) and isinstance(value, Mapping)
    }


def stale_trials(
    study: optuna.Study,
    own_run_id: str,
    grace: float,
    observer: LeaseObserver | None = None,
    trials: Iterable[FrozenTrial] | None = None,
) -> list[FrozenTrial]:
    """RUNNING trials of other drivers whose lease ``observer`` has seen unchanged for more
    than ``grace`` seconds, or that was released. A trial with no owner yet (its driver died
    between ask and recording itself) is stale once ``observer`` has seen it so for more
    than ``grace``. Without an observer (a fresh one) only released leases, and owners
    without any lease, count as dead.

    On RDB storage the RUNNING trials and their owners are read from the database in one
    light query (never from a cached view), and only the stale ones are loaded in full."""
    observer = observer or LeaseObserver()
    if trials is None:
        return _path(study).stale(study, own_run_id, grace, observer)
    return _stale_among(study, trials, own_run_id, grace, observer)


def _stale_among(
    study: optuna.Study,
    trials: Iterable[FrozenTrial],
    own_run_id: str,
    grace: float,
    observer: LeaseObserver,
) -> list[FrozenTrial]:
    running = [t for t in trials if t.state == TrialState.RUNNING]
    leases = _leases(study) if running else {}
    stale = [
        trial
        for trial in running
        if _dead(
            observer,
            internals.trial_id(trial),
            trial.user_attrs.get(RUN_ID),
            own_run_id,
            leases,
            grace,
        )
    ]
    _forget(observer, [internals.trial_id(t) for t in running], leases)
    return stale


def _forget(observer: LeaseObserver, trial_ids: list[int], leases: Mapping[str, Any]) -> None:
    observer.forget_except({("trial", t) for t in trial_ids} | {("lease", r) for r in leases})


def _dead(
    observer: LeaseObserver,
    trial: int,
    owner: str | None,
    own_run_id: str,
    leases: Mapping[str, Mapping[str, Any]],
    grace: float,
) -> bool:
    """Whether a RUNNING trial's driver is gone: the lease rule of :func:`stale_trials`."""
    if owner == own_run_id:
        return False
    lease = leases.get(owner) if owner else None
    if lease is not None:
        if lease.get("released"):
            return True
        # the renewal counter (a lease of an older simcal: its renewal time, as a marker only)
        marker = lease.get("renewals", lease.get("renewed"))
        return _aged(observer.unchanged_for(("lease", owner), marker), grace)
    if owner is not None:
        return True  # a driver of a version without leases
    return _aged(observer.unchanged_for(("trial", trial), None), grace)


def _aged(unchanged: float, grace: float) -> bool:
    """Past ``grace``; a grace of 0 (no grace: tests, a deliberate takeover) is past at once."""
    return grace <= 0 or unchanged > grace


def recover_stale(
    study: optuna.Study,
    own_run_id: str,
    grace: float,
    names: Collection[str] = (),
    observer: LeaseObserver | None = None,
) -> list[int]:
    """Claim other drivers' stale RUNNING trials and enqueue them again; their numbers.

    ``names``: the study's parameter names; a trial without all of them was killed mid-ask
    (never submitted) and is not retried. ``observer``: the caller's, kept across calls
    (:func:`stale_trials`)."""
    return _recover(_path(study), study, own_run_id, grace, names, observer or LeaseObserver())


def _recover(
    path: _PublicTrials,
    study: optuna.Study,
    own_run_id: str,
    grace: float,
    names: Collection[str],
    observer: LeaseObserver,
) -> list[int]:
    stale = with_retries(lambda: path.stale(study, own_run_id, grace, observer), what="read leases")
    return [trial.number for trial in stale if _requeue(path, study, trial, names)]


# -- the front door -----------------------------------------------------------------------------


class TrialStore:
    """A driver run's one door to its stored trials (here, beside the two storage paths it
    chooses between and the lease rules it applies, which :mod:`simcal.trials`' functions
    share: a module of its own would reach into this one's private halves).

    Built once per run: the RDB or public path is chosen when it is built, as Optuna chooses
    its heartbeat thread once, and never re-checked per call. Every operation retries
    transient database errors and reports its wall seconds to ``timer(operation, seconds)``
    (``simcal_storage_seconds``: ``ask``, ``tell`` or ``other``). The run's identity
    (``run_id``, ``host``), its lease (:meth:`open`) and its :class:`LeaseObserver` live here.
    """

    def __init__(
        self,
        study: optuna.Study,
        distributions: Mapping[str, Any],
        *,
        run_id: str,
        host: str | None = None,
        lease_interval: float = DEFAULT_LEASE_INTERVAL,
        lease_grace: float = DEFAULT_LEASE_GRACE,
        timer: Callable[[str, float], None] | None = None,
    ) -> None:
        self.study = study
        self.run_id = run_id
        self.host = host or driver_host()
        self.lease_interval, self.lease_grace = lease_interval, lease_grace
        self._distributions = dict(distributions)
        self._owner = {RUN_ID: run_id, HOST: self.host}
        self._path = _path(study)
        self._timer = timer or (lambda operation, seconds: None)
        self._observer = LeaseObserver()  # other drivers' leases, aged on our monotonic clock

    @property
    def fast(self) -> bool:
        """Whether the run takes the RDB fast path (else Optuna's public API)."""
        return self._path.fast

    @contextlib.contextmanager
    def _timed(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._timer(operation, time.perf_counter() - started)

    # -- the run -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        """The run's lease held (written first, renewed, released after) and the driver's view
        of the study (:meth:`view`) for the block."""
        lease = DriverLease(self.study, self.run_id, interval=self.lease_interval, host=self.host)
        lease.start()
        try:
            with self.view():
                yield
        finally:
            lease.release()

    def view(self, seconds: float = 0.5) -> contextlib.AbstractContextManager:
        """Within the block, the study is seen as a driver sees it: its own trials written
        through, other drivers' changes read at most every ``seconds`` (RDB path; yields its
        storage, else None). Tallies, tells and claims read the database directly."""
        return self._path.view(self.study, seconds)

    def paths(self) -> dict[str, Any]:
        """Which storage and sampler path the run takes (``optuna_internals.fast_path``)."""
        return internals.fast_path(self.study)

    @staticmethod
    def describe_paths(paths: Mapping[str, Any]) -> str:
        """:meth:`paths` as one log-line phrase."""
        return internals.describe_fast_path(paths)

    # -- reads ---------------------------------------------------------------------------------

    def stored_count(self) -> int:
        """How many trials the study holds (any state)."""
        with self._timed("other"):
            return with_retries(
                lambda: len(self.study.get_trials(deepcopy=False)), what="resume"
            )

    def best_values(self, limit: int) -> list[float]:
        """The ``limit`` lowest values of completed trials, ascending."""

        def read() -> list[float]:
            completed = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            return sorted(t.value for t in completed if t.value is not None)[:limit]

        with self._timed("other"):
            return with_retries(read, what="read best trials")

    def tally(self, *, before: optuna.Trial | None = None) -> Tally:
        """The budget tally of every driver's trials, read from the database; ``before``: of
        the trials created before that one (a study's trials are created one at a time)."""
        below = None if before is None else internals.trial_id(before)
        with self._timed("other"):
            return with_retries(
                lambda: self._path.tally(self.study, below), what="count trials"
            )

    # -- writes --------------------------------------------------------------------------------

    def ask(self, *, waiting: bool) -> optuna.Trial:
        """Ask a trial recording this run as its owner (:data:`RUN_ID`, :data:`HOST`): on the
        RDB path parameters and owner in one transaction. ``waiting=False``: the tally found no
        enqueued trial to pop, so none is looked for."""
        with self._timed("ask"):
            return with_retries(
                lambda: self._path.ask(
                    self.study, self._distributions, self._owner, waiting=waiting
                ),
                what="ask",
            )

    def tell(
        self,
        trial: optuna.Trial | FrozenTrial,
        value: float | None = None,
        *,
        state: TrialState = TrialState.COMPLETE,
        attrs: Mapping[str, Any] | None = None,
        what: str = "tell",
    ) -> bool:
        """Tell one trial (:func:`tell`)."""
        with self._timed("tell"):
            return self._path.tell_many(
                self.study, [Told(trial, value, state, dict(attrs or {}))], what
            )[0]

    def tell_many(self, results: list[Told]) -> list[bool]:
        """Tell a batch in one transaction on the RDB path (:func:`tell_many`)."""
        if not results:
            return []
        with self._timed("tell"):
            return self._path.tell_many(self.study, results, "tell")

    def requeue(self, trial: FrozenTrial | optuna.Trial) -> bool:
        """Claim one of this run's trials as interrupted and enqueue it again (:func:`requeue`)."""
        with self._timed("tell"):
            return _requeue(self._path, self.study, trial, ())

    def recover_stale(self) -> list[int]:
        """Claim other drivers' stale trials and enqueue them again (:func:`recover_stale`)."""
        with self._timed("other"):
            return _recover(
                self._path,
                self.study,
                self.run_id,
                self.lease_grace,
                self._distributions,
                self._observer,
            )

    def read_fresh(self) -> None:
        """Bring the driver's view (:meth:`view`) up to date now."""
        with self._timed("other"):
            with_retries(lambda: self._path.read_fresh(self.study), what="read trials")

    def prune(self, trial: optuna.Trial, value: float, step: int) -> bool:
        """Report a partial loss and ask the pruner, on a view brought up to date first (the
        pruner compares this trial with every other's rungs)."""
        with self._timed("other"):
            with_retries(lambda: trial.report(value, step), what="report")
            with_retries(lambda: self._path.read_fresh(self.study), what="prune")
            return with_retries(trial.should_prune, what="prune")
