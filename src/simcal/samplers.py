"""The optimizer: ``make_sampler``, a resumed run's seed, and every private Optuna member
simcal touches, guarded by the Optuna versions it was verified against.

Optuna's ``TPESampler._sample`` redoes Python work for every stored trial on every ask
(constraint check, sort key, internal representation of the parameters), which grows to
tens of milliseconds an ask at a few thousand trials. :class:`CachedTPESampler` records
each complete trial once, in numpy arrays, and on an ask only looks at the trials not yet
finished. It builds the same Parzen estimators from the same observations in the same
order, so it suggests exactly what ``TPESampler`` would with the same seed. Cases it does
not cover (several objectives, constraints, pruned trials, no constant liar) go to Optuna.

It overrides and calls private members of ``TPESampler`` (:data:`TPE_INTERNALS`): on an
Optuna version outside :data:`VERIFIED_OPTUNA`, or one lacking any of them,
:func:`make_sampler` falls back to the stock ``TPESampler`` with one log line. The two
other private members simcal uses (a trial's storage id, a user attribute set through the
study's storage) are wrapped below, so no other module touches Optuna internals.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.samplers import TPESampler

try:  # a private module: a release that moves it falls back to TPESampler (make_sampler)
    from optuna.samplers._tpe.sampler import default_gamma
except ImportError:  # pragma: no cover - only on an unverified Optuna
    default_gamma = None
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.study import Study

log = logging.getLogger(__name__)

# Optuna releases (major.minor) CachedTPESampler was checked against: tests/test_samplers.py
# compares its suggestions with TPESampler's. Add a release only after that test passes on it.
VERIFIED_OPTUNA = ("5.0",)
# The private members CachedTPESampler relies on: of a TPESampler, of a Study.
TPE_INTERNALS = (
    "_sample", "_constant_liar", "_parzen_estimator_cls", "_parzen_estimator_parameters",
    "_rng", "_n_ei_candidates", "_compute_acquisition_func", "_compare", "_gamma",
    "_get_params",
)
STUDY_INTERNALS = ("_is_multi_objective", "_get_trials")  # and its _storage, _study_id

Space = dict[str, "BaseDistribution"]
Observations = dict[str, np.ndarray]


def _internal(params: dict[str, Any], space: Space) -> list[float] | None:
    """The parameters in the sampler's internal representation; None if one is missing."""
    if not space.keys() <= params.keys():
        return None
    return [float(dist.to_internal_repr(params[name])) for name, dist in space.items()]


class _History:
    """The complete trials of one study and search space, appended as they are found."""

    def __init__(self, key: tuple[object, ...], dimensions: int) -> None:
        self.key = key
        self.frontier = 0  # every trial before this position is finished and recorded
        self.recorded: set[int] = set()
        self.size = 0
        self.numbers = np.empty(64, dtype=np.int64)
        self.losses = np.empty(64)
        self.params = np.empty((64, dimensions))
        self.valid = np.empty(64, dtype=bool)

    def add(self, number: int, loss: float, params: list[float] | None) -> None:
        self.recorded.add(number)
        if self.size == len(self.numbers):
            for name in ("numbers", "losses", "params", "valid"):
                array = getattr(self, name)
                setattr(self, name, np.concatenate([array, np.empty_like(array)]))
        index, self.size = self.size, self.size + 1
        self.numbers[index], self.losses[index] = number, loss
        self.valid[index] = params is not None
        if params is not None:
            self.params[index] = params


class CachedTPESampler(TPESampler):
    """``TPESampler`` whose asks do not grow with Python work per stored trial."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._covered = kwargs.get("constraints_func") is None and self._constant_liar
        self._history: _History | None = None

    def _sample(self, study: Study, trial: FrozenTrial, search_space: Space) -> dict[str, Any]:
        if not self._covered or study._is_multi_objective() or not search_space:
            return super()._sample(study, trial, search_space)
        running = self._update(study, trial, search_space)
        if running is None:  # pruned trials: Optuna's path
            return super()._sample(study, trial, search_space)
        below, above = self._split(study, running, search_space)
        parameters = self._parzen_estimator_parameters
        estimators = [
            self._parzen_estimator_cls(observations, search_space, parameters)
            for observations in (below, above)
        ]
        samples = estimators[0].sample(self._rng.rng, self._n_ei_candidates)
        best = self._compare(samples, self._compute_acquisition_func(samples, *estimators))
        return {name: dist.to_external_repr(best[name]) for name, dist in search_space.items()}

    def _update(self, study: Study, trial: FrozenTrial, space: Space) -> list[FrozenTrial] | None:
        """Record newly complete trials; the running ones other than ``trial`` (None: pruned)."""
        key = (id(study._storage), study._study_id, *space.items())
        if self._history is None or self._history.key != key:
            self._history = _History(key, len(space))
        history = self._history
        trials = study._get_trials(deepcopy=False, states=None, use_cache=False)  # by number
        running = []
        for position in range(history.frontier, len(trials)):
            other = trials[position]
            if other.state == TrialState.RUNNING and other.number != trial.number:
                running.append(other)
            elif other.state == TrialState.COMPLETE and other.number not in history.recorded:
                history.add(other.number, other.value, _internal(other.params, space))
            elif other.state == TrialState.PRUNED:
                return None
            if position == history.frontier and other.state.is_finished():
                history.frontier += 1
        return running

    def _split(
        self, study: Study, running: list[FrozenTrial], space: Space
    ) -> tuple[Observations, Observations]:
        """Observations below and above the gamma quantile, each in trial-number order.

        As Optuna: the best ``gamma(n)`` complete trials (sorted by loss, ties by number)
        are below; the other complete trials and the running ones are above.
        """
        history = self._history
        assert history is not None
        size = history.size
        numbers, losses = history.numbers[:size], history.losses[:size]
        if study.direction == StudyDirection.MAXIMIZE:
            losses = -losses
        order = np.lexsort((numbers, losses))
        n_below = min((self._gamma or default_gamma)(size), size)
        below = order[:n_below]
        above = order[n_below:]
        rows = [_internal(self._get_params(t, study), space) for t in running]
        filled = np.array([row or [np.nan] * len(space) for row in rows]).reshape(-1, len(space))
        running_numbers = np.array([t.number for t in running], dtype=np.int64)
        running_valid = np.array([row is not None for row in rows], dtype=bool)
        return (
            _ordered(numbers[below], history.params[below], history.valid[below], space),
            _ordered(
                np.concatenate([numbers[above], running_numbers]),
                np.concatenate([history.params[above], filled]),
                np.concatenate([history.valid[above], running_valid]),
                space,
            ),
        )


def _ordered(
    numbers: np.ndarray, params: np.ndarray, valid: np.ndarray, space: Space
) -> Observations:
    """Each parameter's values in trial-number order, trials lacking a parameter left out."""
    order = np.argsort(numbers, kind="stable")
    rows = params[order][valid[order]]
    return {name: rows[:, i] for i, name in enumerate(space)}


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The optimizer: ``tpe`` (constant liar: many trials in flight), ``random`` or ``cmaes``."""
    if name == "tpe":  # Optuna's TPE with a per-trial cache: same suggestions, cheaper asks
        options: dict[str, Any] = {"constant_liar": True, "multivariate": True, "seed": seed}
        if not cached_tpe_verified():
            return TPESampler(**options)
        return CachedTPESampler(**options)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {name!r}")


def run_seed(seed: int, stored: int) -> int:
    """The sampler's seed for a run that finds ``stored`` trials in its study.

    ``seed`` itself for a new study; for a resumed one a seed derived from both, so each
    run of a study proposes new points (the same seed would repeat the first run's), and
    the same study history gives the same seed.
    """
    if stored == 0:
        return seed
    return int(np.random.SeedSequence([seed, stored]).generate_state(1)[0])


_warned: list[str] = []


def cached_tpe_verified(version: str | None = None) -> bool:
    """Whether CachedTPESampler may run on this Optuna; logs once when it may not."""
    version = version or optuna.__version__
    release = ".".join(version.split(".")[:2])
    sampler = TPESampler(constant_liar=True)
    missing = [name for name in TPE_INTERNALS if not hasattr(sampler, name)]
    missing += [f"Study.{name}" for name in STUDY_INTERNALS if not hasattr(optuna.Study, name)]
    if default_gamma is None:
        missing.append("optuna.samplers._tpe.sampler.default_gamma")
    if release in VERIFIED_OPTUNA and not missing:
        return True
    if version not in _warned:
        _warned.append(version)
        why = f"lacks {', '.join(sorted(set(missing)))}" if missing else "was not verified"
        log.warning(
            "Optuna %s %s for simcal's cached TPE (verified: %s); using Optuna's TPESampler",
            version, why, ", ".join(VERIFIED_OPTUNA),
        )
    return False


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage (Optuna keeps it private; numbers are per study)."""
    return trial._trial_id


def set_trial_user_attr(study: Study, trial_id: int, key: str, value: Any) -> None:
    """Set a user attribute of any RUNNING trial by id, not only one this process asked."""
    study._storage.set_trial_user_attr(trial_id, key, value)
