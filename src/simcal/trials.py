"""The stored-trial lifecycle: a trial's owner, its tell, and recovery of a dead driver's trials.

Several drivers may run one study on one storage at once. Each driver holds a *lease*: a
study system attribute ``simcal:lease:<run_id>`` that a background thread renews every
``interval`` seconds with the driver's wall-clock time. Every trial a driver asks carries its
``run_id`` (and host or ``$POD_NAME``) as user attributes. A RUNNING trial whose lease has
not been renewed for ``grace`` seconds (or was released without telling it) belongs to a
dead driver: any live driver claims it (tells it failed as ``interrupted``, which only one
claimant can do) and enqueues its parameters again. A driver never claims the trials of a
live lease, and a driver that finds its own trial already told ("someone else told it")
drops its result instead of crashing.

Telling writes the trial's user attributes and its state in one transaction. This module is
the only one that touches Optuna's private storage internals.
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
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

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


# -- telling ----------------------------------------------------------------------------------


def storage_internals_verified(version: str | None = None) -> bool:
    """Whether the RDB fast paths here (one-transaction tells, COUNT tallies, throttled reads:
    Optuna's private storage API) may run on this Optuna (``samplers.VERIFIED_OPTUNA``)."""
    from simcal.samplers import VERIFIED_OPTUNA

    version = version or optuna.__version__
    return ".".join(version.split(".")[:2]) in VERIFIED_OPTUNA


def _rdb(study: optuna.Study) -> RDBStorage | None:
    """The study's RDB storage (Optuna wraps it in a cache), or None for other storages and on
    an Optuna not verified with the private storage API: then Optuna's public path is taken."""
    if not storage_internals_verified():
        return None
    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (what Optuna's storage API takes)."""
    return trial._trial_id


def _tell_once(
    study: optuna.Study,
    trial: optuna.Trial | FrozenTrial,
    value: float | None,
    state: TrialState,
    attrs: Mapping[str, Any],
) -> None:
    """Write ``attrs`` and the final state (and value) in one transaction (RDB storage), or
    through Optuna's API otherwise. Raises ``UpdateFinishedTrialError`` if already finished."""
    rdb = _rdb(study)
    if rdb is None:
        for key, item in attrs.items():
            study._storage.set_trial_user_attr(trial_id(trial), key, item)
        study.tell(trial.number, value, state=None if state == TrialState.COMPLETE else state)
        return
    if state == TrialState.PRUNED and value is None:  # as Optuna's tell: the last reported value
        frozen = getattr(trial, "_cached_frozen_trial", trial)
        if frozen.last_step is not None:
            value = frozen.intermediate_values[frozen.last_step]
    values = None if value is None else [value]
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    if values is not None and not all(math.isfinite(v) for v in values):
        state, values = TrialState.FAIL, None  # Optuna tells a NaN loss as failed, too
    frozen = getattr(trial, "_cached_frozen_trial", trial)  # as Optuna's tell: before the write
    study.sampler.after_trial(study, frozen, state, values)
    with _create_scoped_session(rdb.scoped_session) as session:
        model = models.TrialModel.find_or_raise_by_id(trial_id(trial), session, for_update=True)
        rdb.check_trial_is_updatable(trial_id(trial), model.state)
        _upsert_user_attrs(rdb, session, trial_id(trial), attrs)
        for objective, item in enumerate(values or []):
            rdb._set_trial_value_without_commit(session, model, objective, item)
        model.state = state
        model.datetime_complete = datetime.now()


def _told_by_us(
    study: optuna.Study, trial: optuna.Trial | FrozenTrial, attrs: Mapping[str, Any]
) -> bool:
    """After a retried tell met a finished trial: whether it holds our attributes."""
    stored = study._storage.get_trial(trial_id(trial))
    return all(json.dumps(stored.user_attrs.get(k)) == json.dumps(v) for k, v in attrs.items())


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
    attrs = dict(attrs or {})
    if state == TrialState.COMPLETE and value is None:
        raise ValueError("a completed trial needs a value")
    attempts = 0

    def once() -> bool:
        nonlocal attempts
        attempts += 1
        try:
            _tell_once(study, trial, value, state, attrs)
        except optuna.exceptions.UpdateFinishedTrialError:
            if attempts > 1 and _told_by_us(study, trial, attrs):
                return True
            if attrs != {FAIL_REASON: INTERRUPTED}:
                log.warning(
                    "trial %d was already told by another driver (it judged this one dead); "
                    "dropping this result",
                    trial.number,
                )
            return False
        return True

    return with_retries(once, what=what)


def set_owner(trial: optuna.Trial, run_id: str, host: str) -> None:
    """Record which driver runs the trial (two attributes, one transaction on RDB storage)."""
    rdb = _rdb(trial.study)
    if rdb is None:
        trial.set_user_attr(RUN_ID, run_id)
        trial.set_user_attr(HOST, host)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session, True) as session:
        model = models.TrialModel.find_or_raise_by_id(trial_id(trial), session)
        rdb.check_trial_is_updatable(trial_id(trial), model.state)
        _upsert_user_attrs(rdb, session, trial_id(trial), {RUN_ID: run_id, HOST: host})


def _upsert_user_attrs(rdb: RDBStorage, session: Any, trial: int, attrs: Mapping[str, Any]) -> None:
    """Insert or replace a trial's user attributes with one statement (SQLite, PostgreSQL);
    Optuna's own path costs a SELECT and an upsert per attribute (the scale profile)."""
    from optuna.storages._rdb import models

    if not attrs:
        return
    table = models.TrialUserAttributeModel
    if rdb.engine.name not in ("sqlite", "postgresql"):
        for key, item in attrs.items():
            rdb._set_trial_attr_without_commit(session, table, trial, key, item)
        return
    if rdb.engine.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    rows = [{"trial_id": trial, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    statement = insert(table).values(rows)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[table.trial_id, table.key],
            set_={"value_json": statement.excluded.value_json},
        )
    )


@contextlib.contextmanager
def throttled_reads(study: optuna.Study, seconds: float = 0.5) -> Iterator[None]:
    """Within the block, read other drivers' changes to the study at most every ``seconds``
    (RDB storage only); after it, every read is fresh again.

    Optuna re-reads every unfinished trial (with its params and attributes: six queries) on
    each ``get_trials``, and one ask calls it three to four times: most of an ask's cost on
    SQLite. Between reads the study's cached view serves them. What this driver writes is in
    that view at once except the parameters of its own newest trials (the constant liar sees
    them up to ``seconds`` late); other drivers' trials show up within ``seconds``. Counting
    the budget (:func:`tally`), telling and claiming read the database directly.
    """
    cached = study._storage
    read = getattr(cached, "_read_trials_from_remote_storage", None)
    if read is None or _rdb(study) is None:
        yield
        return
    last: dict[int, float] = {}

    def throttled(study_id: int) -> None:
        now = time.monotonic()
        if now - last.get(study_id, -math.inf) >= seconds:
            read(study_id)
            last[study_id] = time.monotonic()

    cached._read_trials_from_remote_storage = throttled
    cached._simcal_fresh_read = read
    try:
        yield
    finally:
        del cached._read_trials_from_remote_storage  # the class's method again
        del cached._simcal_fresh_read


def read_fresh(study: optuna.Study) -> None:
    """Bring the study's cached view up to date now, inside :func:`throttled_reads` too: for
    decisions that compare this trial with every other (the pruner's rungs)."""
    read = getattr(study._storage, "_simcal_fresh_read", None)
    if read is not None:
        read(study._study_id)


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
    attrs = {FAIL_REASON: INTERRUPTED}
    if not tell(study, trial, state=TrialState.FAIL, attrs=attrs, what="interrupt trial"):
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


def counted(trial: FrozenTrial) -> bool:
    """Whether a trial counts towards ``max_trials``: finished (completed, pruned, or failed
    for a reason of its own), and not as ``interrupted``."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get(FAIL_REASON) != INTERRUPTED


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``max_trials`` (:func:`counted`)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if counted(t))


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


def tally(study: optuna.Study) -> Tally:
    """Count the study's trials for the budget: two COUNT queries on RDB storage, so asking
    it before every ask stays cheap; a scan of the trials on other storages."""
    rdb = _rdb(study)
    if rdb is not None:
        return _rdb_tally(rdb, study._study_id)
    done = running = waiting = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.RUNNING:
            running += 1
        elif trial.state == TrialState.WAITING:
            waiting += 1
        elif counted(trial):
            done += 1
    return Tally(done, running, waiting)


def _rdb_tally(rdb: RDBStorage, study_id: int) -> Tally:
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    trial, attr = models.TrialModel, models.TrialUserAttributeModel
    with _create_scoped_session(rdb.scoped_session) as session:
        by_state = dict(
            session.query(trial.state, sqlalchemy.func.count(trial.trial_id))
            .filter(trial.study_id == study_id)
            .group_by(trial.state)
            .all()
        )
        interrupted = (
            session.query(sqlalchemy.func.count(trial.trial_id))
            .join(attr, attr.trial_id == trial.trial_id)
            .filter(
                trial.study_id == study_id,
                trial.state == TrialState.FAIL,
                attr.key == FAIL_REASON,
                attr.value_json == json.dumps(INTERRUPTED),
            )
            .scalar()
        )
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    done = sum(by_state.get(state, 0) for state in finished) - interrupted
    return Tally(done, by_state.get(TrialState.RUNNING, 0), by_state.get(TrialState.WAITING, 0))


# -- leases: which drivers are alive ------------------------------------------------------------


class DriverLease:
    """This driver's lease on a study, renewed by a daemon thread until :meth:`release`."""

    def __init__(
        self,
        study: optuna.Study,
        run_id: str,
        *,
        interval: float = DEFAULT_LEASE_INTERVAL,
        host: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.study = study
        self.run_id = run_id
        self.host = host or driver_host()
        self.interval = interval
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        return LEASE_PREFIX + self.run_id

    def renew(self, *, released: bool = False) -> None:
        value = {"renewed": self._clock(), "host": self.host, "released": released}
        self.study._storage.set_study_system_attr(self.study._study_id, self.key, value)

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


def _leases(study: optuna.Study) -> dict[str, Mapping[str, Any]]:
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return {
        key.removeprefix(LEASE_PREFIX): value
        for key, value in attrs.items()
        if key.startswith(LEASE_PREFIX) and isinstance(value, Mapping)
    }


def stale_trials(
    study: optuna.Study,
    own_run_id: str,
    grace: float,
    now: float | None = None,
    trials: Iterable[FrozenTrial] | None = None,
) -> list[FrozenTrial]:
    """RUNNING trials of other drivers whose lease is stale (older than ``grace`` seconds)
    or released. A trial with no owner yet (its driver died between ask and recording itself)
    is stale once it started more than ``grace`` seconds ago."""
    now = time.time() if now is None else now
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if not running:
        return []
    leases = _leases(study)
    stale = []
    for trial in running:
        owner = trial.user_attrs.get(RUN_ID)
        if owner == own_run_id:
            continue
        lease = leases.get(owner) if owner else None
        if lease is not None:
            dead = bool(lease.get("released")) or now - float(lease["renewed"]) > grace
        elif owner is not None:
            dead = True  # a driver of a version without leases
        else:
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            dead = now - started > grace
        if dead:
            stale.append(trial)
    return stale


def recover_stale(
    study: optuna.Study, own_run_id: str, grace: float, names: Collection[str] = ()
) -> list[int]:
    """Claim other drivers' stale RUNNING trials and enqueue them again; their numbers.

    ``names``: the study's parameter names; a trial without all of them was killed mid-ask
    (never submitted) and is not retried."""
    recovered = []
    stale = with_retries(lambda: stale_trials(study, own_run_id, grace), what="read leases")
    for trial in stale:
        if requeue(study, trial, names):
            recovered.append(trial.number)
    return recovered
