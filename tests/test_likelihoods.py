"""Each likelihood against scipy.stats on known values, and combining replicates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from simcal.likelihoods import combine, negative_log_likelihood
from simcal.targets import mse, poisson_nll

Y = np.array([0.0, 3.0, 7.0, 12.0])
N = np.array([10.0, 10.0, 20.0, 30.0])


@pytest.mark.parametrize(
    ("loss", "simulated", "options", "expected"),
    [
        ("poisson_nll", [0.5, 2.5, 8.0, 11.0], {}, stats.poisson(mu=[0.5, 2.5, 8.0, 11.0])),
        (
            "negative_binomial_nll",
            [0.5, 2.5, 8.0, 11.0],
            {"dispersion": 3.0},
            stats.nbinom(3.0, 3.0 / (3.0 + np.array([0.5, 2.5, 8.0, 11.0]))),
        ),
        ("binomial_nll", [0.1, 0.3, 0.4, 0.35], {"n": N}, stats.binom(N, [0.1, 0.3, 0.4, 0.35])),
        (
            "beta_binomial_nll",
            [0.1, 0.3, 0.4, 0.35],
            {"n": N, "dispersion": 5.0},
            stats.betabinom(N, 5.0 * np.array([0.1, 0.3, 0.4, 0.35]),
                            5.0 * (1 - np.array([0.1, 0.3, 0.4, 0.35]))),
        ),
        ("normal_nll", [0.5, 2.5, 8.0, 11.0], {"sd": 1.5}, stats.norm([0.5, 2.5, 8.0, 11.0], 1.5)),
    ],
)
def test_each_likelihood_matches_scipy(
    loss: str, simulated: list[float], options: dict, expected: object
) -> None:
    logs = expected.logpdf(Y) if loss == "normal_nll" else expected.logpmf(Y)
    value = negative_log_likelihood(loss, np.array(simulated), Y, **options)
    assert value == pytest.approx(-float(np.sum(logs)), rel=1e-12)


def test_known_values_by_hand() -> None:
    # Poisson(3 | 2): -log(2^3 e^-2 / 3!) = 2 - 3 log 2 + log 6
    assert negative_log_likelihood("poisson_nll", np.array([2.0]), np.array([3.0])) == (
        pytest.approx(2 - 3 * math.log(2) + math.log(6))
    )
    # Binomial(2 | 4, 0.5): -log(6 / 16)
    assert negative_log_likelihood(
        "binomial_nll", np.array([0.5]), np.array([2.0]), n=np.array([4.0])
    ) == pytest.approx(-math.log(6 / 16))
    # large dispersion: the negative binomial tends to the Poisson
    nb = negative_log_likelihood("negative_binomial_nll", Y + 1, Y, dispersion=1e9)
    assert nb == pytest.approx(negative_log_likelihood("poisson_nll", Y + 1, Y), rel=1e-6)


def test_the_old_loss_signatures_still_average_replicates() -> None:
    stacked = np.array([[1.0, 2.0], [3.0, 6.0]])
    observed = np.array([2.0, 4.0])
    assert mse(stacked, observed) == 0.0
    assert poisson_nll(stacked, observed) == pytest.approx(
        -stats.poisson.logpmf(observed, [2.0, 4.0]).sum()
    )


def test_combine_is_numerically_safe() -> None:
    losses = np.array([1000.0, 1001.0, 5000.0])
    expected = -np.log(np.mean(np.exp(-(losses - 1000.0)))) + 1000.0
    assert combine(losses, "marginal") == pytest.approx(expected)
    assert combine(losses, "per_replicate") == pytest.approx(np.mean(losses))
