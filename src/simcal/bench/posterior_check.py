"""Posterior coverage check: does the 90 % interval cover a known truth 80-99 % of the time?

Per seed: draw a true (a, b) from the uniform prior, simulate Poisson counts from
``rate_t = exp(a + b * x_t)``, run Optuna's TPE on the Poisson negative log-likelihood
in-process (no Dask: the posterior reads only the stored trials, so the cluster adds
nothing), then compute :func:`simcal.posterior.posterior` and check the intervals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import optuna

from simcal.config import ParameterSpec
from simcal.likelihoods import negative_log_likelihood
from simcal.posterior import posterior, study_proposals

PARAMETERS = {"a": ParameterSpec(low=0.5, high=3.0), "b": ParameterSpec(low=-1.0, high=1.0)}
X = np.linspace(-1.0, 1.0, 8)


def rates(a: float, b: float) -> np.ndarray:
    """The model's expected counts (the synthetic model of this check)."""
    return np.exp(a + b * X)


@dataclass(frozen=True)
class CoverageRun:
    """One seed: the truth, each parameter's 90 % interval and whether it covered."""

    seed: int
    truth: dict[str, float]
    ci90: dict[str, list[float]]
    covered: dict[str, bool]
    ess: float


def one_run(seed: int, trials: int = 300) -> CoverageRun:
    """Calibrate one synthetic data set with TPE and check the posterior against the truth."""
    rng = np.random.default_rng(seed)
    truth = {name: float(rng.uniform(spec.low, spec.high)) for name, spec in PARAMETERS.items()}
    observed = rng.poisson(rates(**truth)).astype(np.float64)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))

    def objective(trial: optuna.Trial) -> float:
        a = trial.suggest_float("a", PARAMETERS["a"].low, PARAMETERS["a"].high)
        b = trial.suggest_float("b", PARAMETERS["b"].low, PARAMETERS["b"].high)
        return negative_log_likelihood("poisson_nll", rates(a, b), observed)

    study.optimize(objective, n_trials=trials)
    result = posterior(study_proposals(study), PARAMETERS, method="importance")
    ci90 = {name: result["parameters"][name]["ci90"] for name in PARAMETERS}
    covered = {name: ci90[name][0] <= truth[name] <= ci90[name][1] for name in PARAMETERS}
    return CoverageRun(seed, truth, ci90, covered, result["effective_sample_size"])


def coverage(seeds: int = 20, trials: int = 300, first_seed: int = 0) -> dict[str, object]:
    """Run ``seeds`` calibrations; the share of runs whose 90 % interval covered each truth."""
    runs = [one_run(seed, trials) for seed in range(first_seed, first_seed + seeds)]
    rate = {name: float(np.mean([r.covered[name] for r in runs])) for name in PARAMETERS}
    return {
        "seeds": seeds,
        "trials_per_seed": trials,
        "sampler": "tpe",
        "method": "importance",
        "coverage90": rate,
        "median_ess": float(np.median([r.ess for r in runs])),
        "runs": [
            {
                "seed": r.seed,
                "truth": r.truth,
                "ci90": r.ci90,
                "covered": r.covered,
                "ess": r.ess,
            }
            for r in runs
        ],
    }
