"""A stochastic SIR model: the example of a modelling team's own package (examples/own-model)."""

from __future__ import annotations

import numpy as np


def simulate(params: dict[str, float], seed: int, days: int = 60, population: int = 10_000) -> dict:
    """Daily new infections of a chain-binomial SIR epidemic with ``beta`` and ``gamma``."""
    rng = np.random.default_rng(seed)
    s, i = population - 10, 10
    incidence = np.zeros(days)
    for day in range(days):
        infected = rng.binomial(s, 1.0 - np.exp(-params["beta"] * i / population))
        recovered = rng.binomial(i, 1.0 - np.exp(-params["gamma"]))
        s, i = s - infected, i + infected - recovered
        incidence[day] = infected
    return {"incidence": incidence}
