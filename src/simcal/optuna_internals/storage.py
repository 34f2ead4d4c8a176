"""The driver's storage path: Optuna's RDB storage API below its public ``Study``/``Trial``.

An ask writes its parameters and owner in one transaction, a tell its attributes and state in
one, the budget is two ``COUNT``s, and the driver's own trials are never re-read from the
database (:class:`DriverStorage`; docs/performance.md). Only on an Optuna the guard admits
(:func:`.guard.storage_verified`); :func:`rdb` is None otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from simcal.optuna_internals.guard import storage_verified

try:  # private modules: a release that moves them takes the public paths (see the guard)
    from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
except ImportError:  # pragma: no cover - only on an unverified Optuna
    _CachedStorage = _StudyInfo = models = _create_scoped_session = None

if TYPE_CHECKING:
    from optuna.study import Study

_RELATIVE_PARAMS_PREFIX = "tpe:relative_params"  # TPESampler's system attribute (constant liar)

# -- handles: a study's storage and ids ---------------------------------------------------------


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (what Optuna's storage API takes; numbers are per study)."""
    return trial._trial_id


def study_id(study: Study) -> int:
    return study._study_id


def study_system_attrs(study: Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


def set_study_system_attr(study: Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)


def set_trial_user_attr(study: Study, trial: int, key: str, value: Any) -> None:
    """Set a user attribute of any unfinished trial by id, not only one this process asked."""
    study._storage.set_trial_user_attr(trial, key, value)


def stored_trial(study: Study, trial: int) -> FrozenTrial:
    """A trial as the database holds it now (no cache)."""
    storage = study._storage
    return getattr(storage, "_backend", storage).get_trial(trial)


# -- the RDB storage path -------------------------------------------------------------------------


def rdb(study: Study) -> RDBStorage | None:
    """The study's RDB storage (Optuna wraps it in a cache), or None for other storages and on
    an Optuna not verified with the private storage API: then Optuna's public path is taken."""
    if not storage_verified():
        return None
    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def _backend(study: Study) -> RDBStorage:
    """The study's RDB storage, for callers on the RDB path: the guard was asked once, when
    the path was chosen (:class:`simcal.trials.TrialStore`), and is not asked again per call."""
    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    assert isinstance(backend, RDBStorage), type(backend).__name__
    return backend


def upsert_user_attrs(
    backend: RDBStorage, session: Any, trial: int, attrs: Mapping[str, Any], *, system: bool = False
) -> None:
    """Insert or replace a trial's user (or system) attributes with one statement (SQLite,
    PostgreSQL); Optuna's own path costs a SELECT and an upsert per attribute."""
    if not attrs:
        return
    table = models.TrialSystemAttributeModel if system else models.TrialUserAttributeModel
    if backend.engine.name not in ("sqlite", "postgresql"):
        for key, item in attrs.items():
            backend._set_trial_attr_without_commit(session, table, trial, key, item)
        return
    if backend.engine.name == "sqlite":
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


Final = tuple["optuna.Trial | FrozenTrial", "list[float] | None", TrialState, Mapping[str, Any]]


def write_finals(study: Study, finals: Sequence[Final]) -> list[bool]:
    """Write several trials' attributes, values and final states in one transaction (a
    group commit: one per batch of results); for each, False if it was already finished
    (another driver claimed it) and so left as stored."""
    backend = _backend(study)
    for trial, values, state, _ in finals:  # as Optuna's tell: before the write
        frozen = getattr(trial, "_cached_frozen_trial", trial)
        study.sampler.after_trial(study, frozen, state, values)
    written: list[datetime | None] = []
    with _create_scoped_session(backend.scoped_session) as session:
        for trial, values, state, attrs in finals:
            tid = trial_id(trial)
            model = models.TrialModel.find_or_raise_by_id(tid, session, for_update=True)
            if model.state.is_finished():
                written.append(None)
                continue
            upsert_user_attrs(backend, session, tid, attrs)
            for objective, item in enumerate(values or []):
                backend._set_trial_value_without_commit(session, model, objective, item)
            model.state = state
            model.datetime_complete = datetime.now()
            written.append(model.datetime_complete)
    storage = study._storage
    if isinstance(storage, DriverStorage):
        for (trial, values, state, attrs), completed in zip(finals, written, strict=True):
            if completed is None:
                storage.forget(trial_id(trial))
            else:
                storage.finished(trial_id(trial), state, values, attrs, completed)
    return [completed is not None for completed in written]


def last_reported(trial: optuna.Trial | FrozenTrial) -> float | None:
    """A trial's last intermediate value (what Optuna's tell stores for a pruned trial)."""
    frozen = getattr(trial, "_cached_frozen_trial", trial)
    if frozen.last_step is None:
        return None
    return frozen.intermediate_values[frozen.last_step]


def count_trials(
    study: Study, reason_key: str, reason_value: Any, *, below: int | None = None
) -> tuple[dict[TrialState, int], int]:
    """The study's trials by state, and the failed ones whose user attribute ``reason_key``
    is ``reason_value``: one grouped query with an outer join (RDB storage). ``below``: only
    the trials whose id is lower (created before it: Optuna creates a study's trials one at
    a time, under a lock on the study's row)."""
    backend = _backend(study)
    trial, attr = models.TrialModel, models.TrialUserAttributeModel
    with _create_scoped_session(backend.scoped_session) as session:
        query = (
            session.query(
                trial.state,
                sqlalchemy.func.count(trial.trial_id),
                sqlalchemy.func.count(attr.trial_id),
            )
            .outerjoin(
                attr,
                sqlalchemy.and_(
                    attr.trial_id == trial.trial_id,
                    attr.key == reason_key,
                    attr.value_json == json.dumps(reason_value),
                ),
            )
            .filter(trial.study_id == study._study_id)
        )
        if below is not None:
            query = query.filter(trial.trial_id < below)
        rows = query.group_by(trial.state).all()
    by_state = {state: count for state, count, _ in rows}
    matching = sum(marked for state, _, marked in rows if state == TrialState.FAIL)
    return by_state, matching


def running_owners(study: Study, owner_key: str) -> list[tuple[int, float, Any]]:
    """Every RUNNING trial of the study as (trial id, start time, ``owner_key`` attribute or
    None), straight from the database: one light query, no parameters loaded."""
    backend = _backend(study)
    trial, attr = models.TrialModel, models.TrialUserAttributeModel
    with _create_scoped_session(backend.scoped_session) as session:
        rows = (
            session.query(trial.trial_id, trial._datetime_start_utc, attr.value_json)
            .outerjoin(
                attr, sqlalchemy.and_(attr.trial_id == trial.trial_id, attr.key == owner_key)
            )
            .filter(trial.study_id == study._study_id, trial.state == TrialState.RUNNING)
            .all()
        )
    return [
        (
            tid,
            started.replace(tzinfo=UTC).timestamp() if started else 0.0,  # naive UTC
            None if owner is None else json.loads(owner),
        )
        for tid, started, owner in rows
    ]


# -- the driver's view of the study ---------------------------------------------------------------

# on an unverified Optuna without the cache class, driver_storage yields None and never builds one
_Base = _CachedStorage if _CachedStorage is not None else object


class DriverStorage(_Base):  # type: ignore[misc, valid-type]
    """Optuna's cached RDB storage, taught which trials are this driver's own.

    Optuna's cache re-reads every unfinished trial (with its parameters and attributes) on
    each read, and the sampler reads three to four times an ask: with 200 trials in flight,
    most of the driver's time (the scale profile in docs/performance.md). Here:

    - the driver's own RUNNING trials are written through: every write to one also updates
      the cached copy, so they are never read back;
    - other drivers' trials are read at most every ``seconds`` (new ones, and unfinished
      ones again), or at once with :meth:`read_now`;
    - an ask's parameters are kept until :meth:`flush` writes them with the owner's
      attributes in one transaction;
    - a sorted trial list is kept per state filter until the cache changes.

    Writes to the database are as durable as Optuna's: each returns after its commit.
    """

    def __init__(self, backend: RDBStorage, seconds: float) -> None:
        super().__init__(backend)
        self.seconds = seconds
        self._own: set[int] = set()
        self._pending: dict[int, list[tuple[str, float, BaseDistribution]]] = {}
        self._pending_system: dict[int, dict[str, Any]] = {}
        self._seen: dict[int, int] = {}  # study id -> the largest trial id read
        self._last_read: dict[int, float] = {}
        self._version = 0
        self._lists: dict[tuple[int, Any], tuple[int, list[FrozenTrial]]] = {}

    # reads

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        if time.monotonic() - self._last_read.get(study_id, -math.inf) >= self.seconds:
            self.read_now(study_id)

    def read_now(self, study_id: int) -> None:
        """Read other drivers' new and unfinished trials now.

        The ids of the trials created since the last read come first (one light query);
        only those not cached already (the driver's own are) are loaded in full, with the
        other drivers' unfinished ones."""
        with self._lock:
            info = self._studies.setdefault(study_id, _StudyInfo())
            seen = self._seen.get(study_id, -1)
            new = self._ids_after(study_id, seen)
            self._last_read[study_id] = time.monotonic()
            wanted = {i for i in new if i not in self._trial_id_to_study_id_and_number}
            wanted |= {i for i in info.unfinished_trial_ids if i not in self._own}
            if new:
                self._seen[study_id] = max(new)
            if not wanted:
                return
            bound = max(seen, *new, *wanted)  # also brings trials created since the ids
            loaded = self._backend._get_trials(study_id, None, wanted, bound)
            trials = [t for t in loaded if t._trial_id not in self._own]
            self._add_trials_to_cache(study_id, trials)
            for trial in trials:
                if trial.state.is_finished():
                    info.unfinished_trial_ids.discard(trial._trial_id)
                else:
                    info.unfinished_trial_ids.add(trial._trial_id)

    def _ids_after(self, study_id: int, seen: int) -> list[int]:
        """The ids of the study's trials above ``seen``."""
        trial = models.TrialModel
        with _create_scoped_session(self._backend.scoped_session) as session:
            rows = (
                session.query(trial.trial_id)
                .filter(trial.study_id == study_id, trial.trial_id > seen)
                .all()
            )
        return [row[0] for row in rows]

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Collection[TrialState] | None = None
    ) -> list[FrozenTrial]:
        self._read_trials_from_remote_storage(study_id)
        key = (study_id, None if states is None else tuple(sorted(s.value for s in states)))
        with self._lock:
            version, trials = self._lists.get(key, (-1, []))
            if version != self._version:
                found = self._studies[study_id].trials.values()
                if states is not None:
                    found = [t for t in found if t.state in states]
                trials = sorted(found, key=lambda t: t.number)
                self._lists[key] = (self._version, trials)
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if trial_id in self._own:
            with self._lock:
                return _detached(self._cached(trial_id))
        return super().get_trial(trial_id)

    # writes: the driver's own trials are written through

    def _cached(self, trial_id: int) -> FrozenTrial:
        study_id, number = self._trial_id_to_study_id_and_number[trial_id]
        return self._studies[study_id].trials[number]

    def _update(self, trial_id: int, **changes: Any) -> None:
        """Replace an own trial's cached copy by one with ``changes`` (call with the lock)."""
        trial = copy.copy(self._cached(trial_id))
        for name, value in changes.items():
            setattr(trial, name, value)
        study_id, number = self._trial_id_to_study_id_and_number[trial_id]
        self._studies[study_id].trials[number] = trial
        self._version += 1

    def _add_trials_to_cache(self, study_id: int, trials: list[FrozenTrial]) -> None:
        super()._add_trials_to_cache(study_id, trials)
        self._version += 1

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        with self._lock:
            if template_trial is None or template_trial.state == TrialState.RUNNING:
                self._own.add(trial_id)
            elif not template_trial.state.is_finished():  # enqueued: any driver may pop it
                self._studies[study_id].unfinished_trial_ids.add(trial_id)
        return trial_id

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        if trial_id not in self._own:
            return super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        with self._lock:
            study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
            known = self._studies[study_id].param_distribution.get(param_name)
            if known is not None:
                check_distribution_compatibility(known, distribution)
            self._pending.setdefault(trial_id, []).append(
                (param_name, param_value_internal, distribution)
            )
            cached = self._cached(trial_id)
            value = distribution.to_external_repr(param_value_internal)
            self._update(
                trial_id,
                params={**cached.params, param_name: value},
                distributions={**cached.distributions, param_name: distribution},
            )

    def flush(self, trial_id: int, user_attrs: Mapping[str, Any]) -> None:
        """Write an own trial's pending parameters and ``user_attrs`` in one transaction."""
        pending = self._pending.get(trial_id, [])
        system = self._pending_system.get(trial_id, {})
        with self._lock:
            study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
            known = self._studies[study_id].param_distribution
        with _create_scoped_session(self._backend.scoped_session, True) as session:
            model = models.TrialModel.find_or_raise_by_id(trial_id, session)
            self._backend.check_trial_is_updatable(trial_id, model.state)
            for name, value, distribution in pending:
                self._backend._set_trial_param_without_commit(
                    session, trial_id, name, value, distribution, known.get(name)
                )
            upsert_user_attrs(self._backend, session, trial_id, system, system=True)
            upsert_user_attrs(self._backend, session, trial_id, user_attrs)
        with self._lock:
            self._pending.pop(trial_id, None)
            self._pending_system.pop(trial_id, None)
            for name, _, distribution in pending:
                known.setdefault(name, distribution)
            self._update(trial_id, user_attrs={**self._cached(trial_id).user_attrs, **user_attrs})

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        super().set_trial_user_attr(trial_id, key, value)
        if trial_id in self._own:
            with self._lock:
                self._update(trial_id, user_attrs={**self._cached(trial_id).user_attrs, key: value})

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id not in self._own:
            return super().set_trial_system_attr(trial_id, key, value)
        with self._lock:
            if not key.startswith(_RELATIVE_PARAMS_PREFIX):
                self._pending_system.setdefault(trial_id, {})[key] = value
            # else: TPE's note of the parameters for other processes before they are stored;
            # flush stores the parameters themselves in the trial's next transaction
            attrs = {**self._cached(trial_id).system_attrs, key: value}
            self._update(trial_id, system_attrs=attrs)

    def set_trial_intermediate_value(self, trial_id: int, step: int, value: float) -> None:
        super().set_trial_intermediate_value(trial_id, step, value)
        if trial_id in self._own:
            with self._lock:
                values = {**self._cached(trial_id).intermediate_values, step: value}
                self._update(trial_id, intermediate_values=values)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        try:
            changed = super().set_trial_state_values(trial_id, state=state, values=values)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.forget(trial_id)
            raise
        if changed:  # a popped waiting trial becomes ours; a told one is read back once
            self.forget(trial_id, own=state == TrialState.RUNNING)
        return changed

    def finished(
        self,
        trial_id: int,
        state: TrialState,
        values: list[float] | None,
        attrs: Mapping[str, Any],
        completed: datetime | None,
    ) -> None:
        """An own trial was told (:func:`write_finals`): update the cached copy."""
        with self._lock:
            if trial_id not in self._own:
                return  # another driver's trial: the next read brings it
            self._own.discard(trial_id)
            self._update(
                trial_id,
                state=state,
                values=values,
                user_attrs={**self._cached(trial_id).user_attrs, **attrs},
                datetime_complete=completed,
            )

    def release(self) -> None:
        """From now on a plain cache: every read fresh, any own trial still open re-read."""
        with self._lock:
            self.seconds = 0.0
            for trial_id in self._own:
                study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
                self._studies[study_id].unfinished_trial_ids.add(trial_id)
            self._own.clear()

    def forget(self, trial_id: int, *, own: bool = False) -> None:
        """Read one trial from the database into the cache (another driver changed it)."""
        trial = self._backend.get_trial(trial_id)
        with self._lock:
            study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
            info = self._studies[study_id]
            self._add_trials_to_cache(study_id, [trial])
            if own:
                self._own.add(trial_id)
            else:
                self._own.discard(trial_id)
            if trial.state.is_finished() or own:
                info.unfinished_trial_ids.discard(trial_id)
            else:
                info.unfinished_trial_ids.add(trial_id)


def _detached(trial: FrozenTrial) -> FrozenTrial:
    """A copy of a cached trial whose dicts a ``Trial`` may change (cheaper than deepcopy;
    the values themselves are never mutated)."""
    copied = copy.copy(trial)
    copied.params, copied.distributions = dict(trial.params), dict(trial.distributions)
    copied.user_attrs, copied.system_attrs = dict(trial.user_attrs), dict(trial.system_attrs)
    copied.intermediate_values = dict(trial.intermediate_values)
    return copied


@contextlib.contextmanager
def driver_storage(study: Study, seconds: float = 0.5) -> Iterator[DriverStorage]:
    """Within the block, the study reads and writes through a :class:`DriverStorage` (the
    RDB path only, which :class:`simcal.trials.TrialStore` chose: RDB storage on a verified
    Optuna; on the public path the study keeps Optuna's own cache).

    After the block the study keeps that storage, as a plain cache: every read is fresh
    again and nothing counts as the driver's own. (Swapping Optuna's cache back in would
    load every trial a second time: at 5,000 trials the driver's memory grew by a third.)"""
    storage = study._storage = DriverStorage(_backend(study), seconds)
    try:
        yield storage
    finally:
        storage.release()


def read_fresh(study: Study) -> None:
    """Bring the driver's cached view up to date now: for decisions that compare this trial
    with every other (the pruner's rungs)."""
    storage = study._storage
    if isinstance(storage, DriverStorage):
        storage.read_now(study._study_id)


def ask(
    study: Study,
    distributions: Mapping[str, BaseDistribution],
    user_attrs: Mapping[str, Any],
    *,
    waiting: bool = True,
) -> optuna.Trial:
    """``study.ask(distributions)`` plus ``user_attrs``; through a :class:`DriverStorage` the
    parameters and attributes are one transaction, and ``waiting=False`` (the budget tally
    found no enqueued trial) skips looking for one."""
    storage = study._storage
    if not isinstance(storage, DriverStorage):
        trial = study.ask(dict(distributions))
        for key, value in user_attrs.items():
            trial.set_user_attr(key, value)
        return trial
    trial_id = None
    if waiting:
        storage.read_now(study._study_id)  # an enqueued trial is popped from a fresh view
        trial_id = study._pop_waiting_trial_id()
    if trial_id is None:
        trial_id = storage.create_new_trial(study._study_id)
    study._thread_local.cached_all_trials = None
    trial = optuna.Trial(study, trial_id)
    for name, distribution in distributions.items():
        trial._suggest(name, distribution)
    storage.flush(trial_id, user_attrs)
    return trial
