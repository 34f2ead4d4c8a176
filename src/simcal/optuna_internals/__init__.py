"""Every private Optuna member simcal touches, in one package, behind one version guard.

simcal relies on Optuna internals for speed in two places, and nowhere else:

Modules: :mod:`.guard` (the version guard), :mod:`.storage` (the storage path), :mod:`.tpe`
(the sampler); this package re-exports what callers use and says which path a run takes
(:func:`fast_path`).

- **The driver's storage path** (:class:`DriverStorage`, :func:`ask`, :func:`write_finals`,
  :func:`count_trials`, :func:`running_owners`): Optuna's RDB storage API below its public
  ``Study``/``Trial`` methods, so that an ask writes its parameters and owner in one
  transaction, a tell its attributes and state in one, the budget is two ``COUNT``s, and the
  driver's own trials are never re-read from the database (docs/performance.md).
- **The sampler** (:class:`CachedTPESampler`): ``TPESampler``'s private sampling members, so
  that an ask does not redo Python work for every stored trial.

On an Optuna release outside :data:`VERIFIED_OPTUNA`, or one lacking a member used here,
:func:`storage_verified` and :func:`cached_tpe_verified` say no and the callers
(:mod:`simcal.trials`, :func:`simcal.samplers.make_sampler`) take Optuna's public path, with
one log line. tests/test_trials.py and tests/test_samplers.py force that fallback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optuna
from optuna.samplers import TPESampler
from optuna.storages import RDBStorage

from simcal.optuna_internals import guard
from simcal.optuna_internals.guard import (
    VERIFIED_OPTUNA,
    cached_tpe_verified,
    storage_verified,
)
from simcal.optuna_internals.storage import (
    DriverStorage,
    Final,
    ask,
    count_trials,
    driver_storage,
    last_reported,
    rdb,
    read_fresh,
    running_owners,
    set_study_system_attr,
    set_trial_user_attr,
    stored_trial,
    study_id,
    study_system_attrs,
    trial_id,
    upsert_user_attrs,
    write_finals,
)
from simcal.optuna_internals.tpe import CachedTPESampler

if TYPE_CHECKING:
    from optuna.study import Study

__all__ = [
    "VERIFIED_OPTUNA",
    "CachedTPESampler",
    "DriverStorage",
    "Final",
    "ask",
    "cached_tpe_verified",
    "count_trials",
    "describe_fast_path",
    "driver_storage",
    "fast_path",
    "last_reported",
    "rdb",
    "read_fresh",
    "running_owners",
    "set_study_system_attr",
    "set_trial_user_attr",
    "storage_verified",
    "stored_trial",
    "study_id",
    "study_system_attrs",
    "trial_id",
    "upsert_user_attrs",
    "write_finals",
]

def fast_path(study: Study) -> dict[str, Any]:
    """Which storage and sampler path a run of ``study`` takes: the run's summary, its first
    progress line and ``simcal_build_info`` report it (a slower path is never silent).

    ``storage``: the driver's RDB path (one transaction per ask and per batch of tells, COUNT
    tallies, its own cache), or Optuna's public one (another storage, an unverified Optuna).
    ``sampler``: False only when a TPE study runs Optuna's ``TPESampler`` instead of
    :class:`CachedTPESampler` (other samplers have no cached variant to miss)."""
    version = optuna.__version__
    verified = ", ".join(guard.VERIFIED_OPTUNA)  # read now: tests narrow it
    unverified = f"Optuna {version} not verified (verified: {verified})"
    storage = rdb(study) is not None
    if storage:
        storage_path = "simcal-rdb"
    else:
        backend = getattr(study._storage, "_backend", study._storage)
        why = unverified if isinstance(backend, RDBStorage) else type(backend).__name__
        storage_path = f"optuna-public ({why})"
    sampler = study.sampler
    slow_tpe = isinstance(sampler, TPESampler) and not isinstance(sampler, CachedTPESampler)
    sampler_path = type(sampler).__name__ + (f" ({unverified})" if slow_tpe else "")
    return {
        "storage": storage,
        "sampler": not slow_tpe,
        "storage_path": storage_path,
        "sampler_path": sampler_path,
        "optuna": version,
    }


def describe_fast_path(paths: Mapping[str, Any]) -> str:
    """One log-line phrase for :func:`fast_path`'s answer."""
    line = f"fast_path storage={str(paths['storage']).lower()} "
    line += f"sampler={str(paths['sampler']).lower()}"
    if not (paths["storage"] and paths["sampler"]):
        line += f" (SLOWER PATH: storage {paths['storage_path']}, sampler {paths['sampler_path']})"
    return line
