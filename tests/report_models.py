"""A SEIR model that fails on purpose in parts of its parameter space (test-only code).

Workers import this module as ``report_models``: the report tests send it to every worker
with ``Client.upload_file``.
"""

from __future__ import annotations

import numpy as np

from simcal.models.seir import simulate


class PretendModelError(RuntimeError):
    """Raised on purpose: a model crash the report must show as a failure."""


def seir_with_faults(params: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """The SEIR demo; fails for gamma > 0.4 (an error) and returns NaN for beta > 0.9."""
    if params["gamma"] > 0.4:
        raise PretendModelError("gamma above 0.4 is outside this model's validity")
    output = simulate(params, seed)
    if params["beta"] > 0.9:
        output["incidence"] = np.full_like(output["incidence"], np.nan)
    return output


def always_fails(params: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    raise PretendModelError("this model always fails")


def sir_share(params: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """A small stochastic SIR of 1,000 people: the share infected on days 0..100 (a
    probability, for a binomial target of x positives of n tested on some days)."""
    rng = np.random.default_rng(seed)
    people, susceptible, infected = 1000, 990, 10
    share = []
    for _ in range(101):
        share.append(infected / people)
        new = rng.binomial(susceptible, 1 - np.exp(-params["beta"] * infected / people))
        recovered = rng.binomial(infected, params["gamma"])
        susceptible, infected = susceptible - new, infected + new - recovered
    return {"t": np.arange(101.0), "infected": np.array(share)}
