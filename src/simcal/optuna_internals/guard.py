"""The version guard: which Optuna releases simcal's private-member paths may run on.

The storage path (:mod:`.storage`) and the cached TPE (:mod:`.tpe`) run only on a release in
:data:`VERIFIED_OPTUNA` that has every member they use; otherwise the callers take Optuna's
public paths, with one log line. tests/test_trials.py and tests/test_samplers.py force that.
"""

from __future__ import annotations

import logging
import threading

import optuna
from optuna.samplers import TPESampler
from optuna.storages import RDBStorage

try:  # private modules: a release that moves them takes the public paths
    from optuna.samplers._tpe.sampler import default_gamma
    from optuna.storages._cached_storage import _CachedStorage
    from optuna.storages._rdb import models
except ImportError:  # pragma: no cover - only on an unverified Optuna
    default_gamma = _CachedStorage = models = None

log = logging.getLogger(__name__)


# Optuna releases (major.minor) verified against: tests/test_samplers.py compares
# CachedTPESampler's suggestions with TPESampler's, tests/test_trials.py and
# tests/test_multi_driver.py run the storage path. Add a release only after they pass on it,
# and move pyproject.toml's bound on optuna with it (tests/test_trials.py checks the two agree):
# a plain `pip install .` must never resolve to a release that takes the public paths.
VERIFIED_OPTUNA = ("5.0", "5.1")
# The private members CachedTPESampler relies on: of a TPESampler, of a Study.
TPE_INTERNALS = (
    "_sample",
    "_constant_liar",
    "_parzen_estimator_cls",
    "_parzen_estimator_parameters",
    "_rng",
    "_n_ei_candidates",
    "_compute_acquisition_func",
    "_compare",
    "_gamma",
    "_get_params",
)
STUDY_INTERNALS = ("_is_multi_objective", "_get_trials", "_pop_waiting_trial_id")
RDB_INTERNALS = (
    "_get_trials",
    "_set_trial_param_without_commit",
    "check_trial_is_updatable",
    "_set_trial_value_without_commit",
    "_set_trial_attr_without_commit",
)


def _release(version: str | None) -> str:
    return ".".join((version or optuna.__version__).split(".")[:2])



def storage_verified(version: str | None = None) -> bool:
    """Whether the RDB paths (:mod:`.storage`) may run on this Optuna (:data:`VERIFIED_OPTUNA`)."""
    if _release(version) not in VERIFIED_OPTUNA or _CachedStorage is None:
        return False
    return (
        all(hasattr(RDBStorage, name) for name in RDB_INTERNALS)
        and all(hasattr(optuna.Study, name) for name in STUDY_INTERNALS)
        and hasattr(models.TrialModel, "_datetime_start_utc")
    )


_warned: list[str] = []
_warned_lock = threading.Lock()


def cached_tpe_verified(version: str | None = None) -> bool:
    """Whether CachedTPESampler may run on this Optuna; logs once when it may not."""
    version = version or optuna.__version__
    sampler = TPESampler(constant_liar=True)
    missing = [name for name in TPE_INTERNALS if not hasattr(sampler, name)]
    missing += [f"Study.{name}" for name in STUDY_INTERNALS if not hasattr(optuna.Study, name)]
    if default_gamma is None:
        missing.append("optuna.samplers._tpe.sampler.default_gamma")
    if _release(version) in VERIFIED_OPTUNA and not missing:
        return True
    with _warned_lock:
        if version in _warned:
            return False
        _warned.append(version)
    why = f"lacks {', '.join(sorted(set(missing)))}" if missing else "was not verified"
    log.warning(
        "Optuna %s %s for simcal's cached TPE (verified: %s); using Optuna's TPESampler",
        version,
        why,
        ", ".join(VERIFIED_OPTUNA),
    )
    return False
