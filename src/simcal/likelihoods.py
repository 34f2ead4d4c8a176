"""Loss functions of one target: mse and negative log-likelihoods (scipy.stats), and replicates.

Every function here compares simulated values that are already aligned to the observed
times. Log-densities come from :mod:`scipy.stats`; nothing is hand-written but the
bookkeeping. scipy is imported on a loss's first call, not with this module: the driver
imports this module to build targets but computes no loss (the workers do, and the probe's
check runs on one), and scipy.stats took 0.6 s of its start on a core the workers wanted.

``combine`` decides how R replicates meet the data:

- ``mean``: the loss of the replicate mean (the model's expected value);
- ``per_replicate``: the mean over replicates of each replicate's loss;
- ``marginal``: minus the log of the mean likelihood over replicates,
  ``-(logsumexp(loglik_r) - log R)``, a Monte Carlo estimate of the marginal likelihood.
"""

from __future__ import annotations

import math

import numpy as np

from simcal.failures import ModelOutputError, NonFiniteLossError

PROBABILITY_LOSSES = ("binomial_nll", "beta_binomial_nll")  # the model gives a probability
RATE_LOSSES = ("poisson_nll", "negative_binomial_nll")  # the model gives an expected count
EPSILON = 1e-12


def check_simulated(target: str, loss: str, simulated: np.ndarray, labels: list[str]) -> None:
    """Fail the trial, naming the first bad point, on NaN or out-of-range simulated values."""
    flat = np.asarray(simulated, dtype=np.float64).reshape(-1, *simulated.shape[-1:])
    bad = ~np.isfinite(flat)
    if bad.any():
        index = int(np.argwhere(bad)[0][-1])
        raise NonFiniteLossError(
            f"target {target!r}: loss is nan: simulated value is {flat[bad][0]} "
            f"at {_label(labels, index)}"
        )
    if loss in RATE_LOSSES and (flat < 0).any():
        index = int(np.argwhere(flat < 0)[0][-1])
        raise ModelOutputError(
            f"target {target!r}: {loss} needs non-negative simulated counts, "
            f"got {flat[flat < 0][0]} at {_label(labels, index)}"
        )
    if loss in PROBABILITY_LOSSES and ((flat < 0) | (flat > 1)).any():
        where = (flat < 0) | (flat > 1)
        index = int(np.argwhere(where)[0][-1])
        raise ModelOutputError(
            f"target {target!r}: {loss} needs a simulated probability in [0, 1], "
            f"got {flat[where][0]} at {_label(labels, index)}"
        )


def probability_of_counts(
    target: str, counts: np.ndarray, n: np.ndarray, labels: list[str], source: str
) -> np.ndarray:
    """A simulated count ``x`` of ``n`` as the probability ``x / n`` (binomial-family losses
    with ``simulated: count``); fails the trial, naming the first bad point, unless
    ``0 <= x <= n`` and ``n > 0``. ``source`` says where ``n`` came from, for the message."""
    x = np.asarray(counts, dtype=np.float64)
    total = np.broadcast_to(np.asarray(n, dtype=np.float64), x.shape)
    check_simulated(target, "count", x, labels)
    bad = ~np.isfinite(total) | (total <= 0) | (x < 0) | (x > total)
    if bad.any():
        index = int(np.argwhere(bad)[0][-1])
        raise ModelOutputError(
            f"target {target!r}: simulated: count needs 0 <= count <= n and n > 0 "
            f"(n from {source}), got count {x[bad][0]:g} of n {total[bad][0]:g} at "
            f"{_label(labels, index)}"
        )
    return x / total


def _label(labels: list[str], index: int) -> str:
    return labels[index] if index < len(labels) else f"index {index}"


def negative_log_likelihood(
    loss: str,
    simulated: np.ndarray,
    observed: np.ndarray,
    *,
    n: np.ndarray | None = None,
    dispersion: float | None = None,
    sd: float | None = None,
) -> float:
    """The summed negative log-likelihood of ``observed`` given one simulated series.

    ``simulated`` is an expected count (poisson, negative binomial), a probability
    (binomial, beta-binomial, with ``n`` trials per point) or a mean (normal).
    """
    from scipy import stats

    mu = np.asarray(simulated, dtype=np.float64)
    y = np.asarray(observed, dtype=np.float64)
    if loss == "poisson_nll":
        logpmf = stats.poisson.logpmf(y, np.maximum(mu, EPSILON))
    elif loss == "negative_binomial_nll":
        k = float(dispersion)  # size: variance = mu + mu^2 / k
        logpmf = stats.nbinom.logpmf(y, k, k / (k + np.maximum(mu, EPSILON)))
    elif loss == "binomial_nll":
        logpmf = stats.binom.logpmf(y, n, np.clip(mu, EPSILON, 1 - EPSILON))
    elif loss == "beta_binomial_nll":
        k = float(dispersion)  # concentration a + b: variance shrinks to binomial as k grows
        p = np.clip(mu, EPSILON, 1 - EPSILON)
        logpmf = stats.betabinom.logpmf(y, n, p * k, (1 - p) * k)
    elif loss == "normal_nll":
        logpmf = stats.norm.logpdf(y, mu, float(sd))
    else:
        raise ValueError(f"unknown likelihood {loss!r}")
    return float(-np.sum(logpmf))


def mse(simulated: np.ndarray, observed: np.ndarray) -> float:
    """Mean squared error of one simulated series."""
    return float(np.mean((np.asarray(simulated) - observed) ** 2))


def combine(per_replicate_losses: np.ndarray, how: str) -> float:
    """Combine per-replicate losses: ``per_replicate`` (mean) or ``marginal`` (log-mean-exp)."""
    losses = np.asarray(per_replicate_losses, dtype=np.float64)
    if how == "per_replicate":
        return float(np.mean(losses))
    if how == "marginal":
        from scipy import special

        return float(-(special.logsumexp(-losses) - math.log(losses.size)))
    raise ValueError(f"combine {how!r} is not a per-replicate combination")
