"""The cached TPE sampler: ``TPESampler``'s private sampling members, so that an ask does not
redo Python work for every stored trial (:class:`CachedTPESampler`). Only on an Optuna the
guard admits (:func:`.guard.cached_tpe_verified`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.samplers import TPESampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

try:  # private module: a release that moves it takes the public path (see the guard)
    from optuna.samplers._tpe.sampler import default_gamma
except ImportError:  # pragma: no cover - only on an unverified Optuna
    default_gamma = None

if TYPE_CHECKING:
    from optuna.study import Study

Space = dict[str, BaseDistribution]
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
    """``TPESampler`` whose asks do not grow with Python work per stored trial.

    Optuna's ``TPESampler._sample`` redoes Python work for every stored trial on every ask
    (constraint check, sort key, internal representation of the parameters), which grows to
    tens of milliseconds an ask at a few thousand trials. This sampler records each complete
    trial once, in numpy arrays, and on an ask only looks at the trials not yet finished. It
    builds the same Parzen estimators from the same observations in the same order, so it
    suggests exactly what ``TPESampler`` would with the same seed. Cases it does not cover
    (several objectives, constraints, pruned trials, no constant liar) go to Optuna.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._covered = kwargs.get("constraints_func") is None and self._constant_liar
        self._history: _History | None = None
        self._running_rows: dict[int, tuple[int, list[float] | None]] = {}

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
            self._running_rows = {}
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

    def _running_row(self, trial: FrozenTrial, study: Study, space: Space) -> list[float] | None:
        """A running trial's parameters, internal representation (kept until they change)."""
        params = self._get_params(trial, study)
        cached = self._running_rows.get(trial.number)
        if cached is not None and cached[0] == len(params):
            return cached[1]
        row = _internal(params, space)
        self._running_rows[trial.number] = (len(params), row)
        return row

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
        rows = [self._running_row(t, study, space) for t in running]
        if len(self._running_rows) > 4 * len(running) + 64:  # forget finished trials
            keep = {t.number for t in running}
            self._running_rows = {n: r for n, r in self._running_rows.items() if n in keep}
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
