"""The optimizer: ``make_sampler`` and a resumed run's seed.

``tpe`` is :class:`~simcal.optuna_internals.CachedTPESampler`, Optuna's TPE with a per-trial
cache (same suggestions, cheaper asks). It uses private Optuna members, so it lives with
every other private call in :mod:`simcal.optuna_internals`; on an Optuna release not
verified there, :func:`make_sampler` falls back to the stock ``TPESampler`` with one log line.
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.samplers import TPESampler

from simcal.optuna_internals import VERIFIED_OPTUNA, CachedTPESampler, cached_tpe_verified

__all__ = ["VERIFIED_OPTUNA", "CachedTPESampler", "make_sampler", "run_seed"]


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The optimizer: ``tpe`` (constant liar: many trials in flight), ``random`` or ``cmaes``.

    Optuna's samplers seed numpy's ``RandomState``, which refuses seeds >= 2**32: a larger
    config ``seed`` (valid up to 2**63 - 1) is reduced through numpy's SeedSequence.
    """
    if not 0 <= seed < 2**32:
        seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    if name == "tpe":  # Optuna's TPE with a per-trial cache: same suggestions, cheaper asks
        options: dict[str, object] = {"constant_liar": True, "multivariate": True, "seed": seed}
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
