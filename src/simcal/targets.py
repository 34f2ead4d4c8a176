"""Observed data and the loss functions that compare replicate outputs with it."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from simcal.config import TargetSpec
from simcal.imports import resolve_callable

LossFunction = Callable[[np.ndarray, np.ndarray], float]


def mse(simulated: np.ndarray, observed: np.ndarray) -> float:
    """Mean squared error between the replicate mean and the observed data."""
    return float(np.mean((simulated.mean(axis=0) - observed) ** 2))


def poisson_nll(simulated: np.ndarray, observed: np.ndarray) -> float:
    """Poisson negative log-likelihood of the observed counts, rate = replicate mean."""
    rate = np.maximum(simulated.mean(axis=0), 1e-9)
    log_factorial = np.array([math.lgamma(k + 1.0) for k in np.ravel(observed)])
    return float(np.sum(rate - observed * np.log(rate)) + log_factorial.sum())


BUILTIN: dict[str, LossFunction] = {"mse": mse, "poisson_nll": poisson_nll}


def loss_function(name: str) -> LossFunction:
    """A built-in loss by name, or a ``module:callable``."""
    return BUILTIN.get(name) or resolve_callable(name)


def _read_csv_column(path: Path, column: str) -> np.ndarray:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if not rows:
        raise ValueError(f"{path}: no data")
    header, body = rows[0], rows[1:]
    try:
        [float(cell) for cell in header]
    except ValueError:
        index = header.index(column) if column in header else 0
    else:  # no header row
        index, body = 0, rows
    try:
        return np.array([float(row[index]) for row in body])
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{path}: column {index} is not numeric: {exc}") from None


def load_observed(target: TargetSpec) -> np.ndarray:
    """Observed data: a CSV column named like the target (or the first), or a callable's array."""
    if target.observed.lower().endswith(".csv"):
        data = _read_csv_column(Path(target.observed), target.name)
    else:
        data = np.asarray(resolve_callable(target.observed)(), dtype=np.float64)
    if data.size == 0 or not np.all(np.isfinite(data)):
        raise ValueError(f"target {target.name!r}: observed data is empty or not finite")
    return data
