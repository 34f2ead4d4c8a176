"""A stochastic SEIR epidemic (binomial chain, daily steps) and data observed from known truth.

Calibrating ``beta`` (transmission rate) and ``gamma`` (recovery rate) against
:func:`observed` should recover :data:`TRUE_PARAMS`.
"""

from __future__ import annotations

import math

import numpy as np

POPULATION = 100_000
INITIAL_INFECTED = 100
DAYS = 120
INCUBATION_RATE = 0.25
TRUE_PARAMS = {"beta": 0.45, "gamma": 0.15}
OBSERVED_SEED = 20_261_129


def simulate(
    params: dict[str, float],
    seed: int,
    *,
    days: int = DAYS,
    population: int = POPULATION,
    initial_infected: int = INITIAL_INFECTED,
    incubation_rate: float = INCUBATION_RATE,
) -> dict[str, np.ndarray]:
    """Run one replicate; returns daily ``incidence`` (new infectious cases per day)."""
    beta, gamma = float(params["beta"]), float(params["gamma"])
    rng = np.random.default_rng(seed)
    p_onset = 1.0 - math.exp(-incubation_rate)
    p_recover = 1.0 - math.exp(-gamma)
    susceptible, exposed, infectious = population - initial_infected, 0, initial_infected
    incidence = np.zeros(days)
    for day in range(days):
        p_infect = 1.0 - math.exp(-beta * infectious / population)
        new_exposed = rng.binomial(susceptible, p_infect)
        new_infectious = rng.binomial(exposed, p_onset)
        new_recovered = rng.binomial(infectious, p_recover)
        susceptible -= new_exposed
        exposed += new_exposed - new_infectious
        infectious += new_infectious - new_recovered
        incidence[day] = new_infectious
    return {"incidence": incidence}


def observed() -> np.ndarray:
    """Daily incidence of one epidemic simulated at :data:`TRUE_PARAMS` (the data to fit)."""
    return simulate(TRUE_PARAMS, OBSERVED_SEED)["incidence"]
