"""A Starsim ``ss.Sim`` as a simcal model: run it with simcal's seed, return its results.

A simcal model is ``simulate(params, seed) -> {name: array, "t": times}``. For Starsim that
is: build the sim for ``params``, :func:`run` it, which sets ``rand_seed`` and returns the
results you name (dotted paths under ``sim.results``) with ``t`` in days since the start::

    from simcal.adapters.starsim import run, smoothed_prevalence

    def simulate(params, seed):
        sim = make_sim(params)                     # your ss.Sim, not yet run
        out = run(sim, seed, infected="sir.n_infected", n="n_alive")
        out["prevalence"] = smoothed_prevalence(out["infected"], out["n"])
        return out

:func:`smoothed_prevalence` with ``beta_binomial_nll`` and ``dispersion: n + 2`` is exactly
Starsim's ``ss.BetaBinomial`` (docs/starsim.md). Starsim is imported only when a sim runs
(the ``starsim`` extra: ``pip install simcal[starsim]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

SEED_MODULUS = 2**31  # seeds simcal hands to models are in [0, 2**31 - 1] (DESIGN.md)


def run(sim: Any, seed: int, **results: str) -> dict[str, np.ndarray]:
    """Run ``sim`` (not yet run) with ``rand_seed = seed``; the named results and ``t``.

    Each keyword is an output name and a dotted path under ``sim.results``, e.g.
    ``infected="sir.n_infected"``. ``t`` is days since the sim's start (0, 1, 2, ...
    for daily steps), the time axis simcal aligns observed data on.
    """
    if not results:
        raise ValueError("name at least one result: run(sim, seed, infected='sir.n_infected')")
    sim.pars["rand_seed"] = int(seed) % SEED_MODULUS
    sim.run()
    outputs = {name: _result(sim.results, path) for name, path in results.items()}
    outputs["t"] = days_since_start(sim.results.timevec)
    return outputs


def _result(results: Any, path: str) -> np.ndarray:
    node = results
    for part in path.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, IndexError):
            raise KeyError(f"sim.results has no {path!r} (no {part!r})") from None
    return np.asarray(node, dtype=np.float64)


def days_since_start(timevec: Any) -> np.ndarray:
    """Starsim's time vector (dates, or numbers for a sim in plain units) as days from its start."""
    values = list(timevec)
    first = values[0]
    if isinstance(first, int | float | np.number):
        return np.asarray(values, dtype=np.float64) - float(first)
    start = np.datetime64(_iso(first), "D")
    return np.array(
        [(np.datetime64(_iso(v), "D") - start) / np.timedelta64(1, "D") for v in values],
        dtype=np.float64,
    )


def _iso(date: Any) -> str:
    # ss.Date is a pandas Timestamp subclass; datetime.date has isoformat too
    return date.isoformat()[:10] if hasattr(date, "isoformat") else str(date)[:10]


def smoothed_prevalence(
    positives: np.ndarray, total: np.ndarray, prior: Mapping[str, float] | None = None
) -> np.ndarray:
    """``(x + a) / (n + a + b)`` with a Beta(a, b) prior (default Beta(1, 1)): Starsim's p-hat.

    ``ss.BetaBinomial`` scores observed x of n against ``BetaBinomial(a = x_sim + 1,
    b = n_sim - x_sim + 1)``; simcal's ``beta_binomial_nll`` uses ``a = p k, b = (1 - p) k``,
    so this ``p`` with ``dispersion k = n_sim + 2`` gives the same likelihood.
    """
    a, b = (prior or {}).get("a", 1.0), (prior or {}).get("b", 1.0)
    x, n = np.asarray(positives, dtype=np.float64), np.asarray(total, dtype=np.float64)
    return (x + a) / (n + a + b)
