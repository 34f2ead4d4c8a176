"""A synthetic model for benchmarks and tests: its cost and its faults are options.

Faults are decided per trial (from the parameters and ``fault_seed``), so every
replicate of a trial behaves alike and a run is reproducible.
"""

from __future__ import annotations

import time

import numpy as np

OUTPUT_LENGTH = 16


class SyntheticModelError(RuntimeError):
    """The error the synthetic model raises on purpose (``error_rate``)."""


def fault_draw(params: dict[str, float], fault_seed: int, stream: int = 0) -> float:
    """The trial's draw in [0, 1): stream 0 picks the fault, stream 1 the memory ballast."""
    values = np.array([params[name] for name in sorted(params)], dtype=np.float64)
    words = values.view(np.uint32).tolist()
    return float(np.random.default_rng([fault_seed, *words]).random(stream + 1)[stream])


def _spin(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def simulate(
    params: dict[str, float],
    seed: int,
    *,
    duration: float = 0.0,
    cpu: float = 0.0,
    nan_rate: float = 0.0,
    error_rate: float = 0.0,
    hang_rate: float = 0.0,
    hang_seconds: float = 3600.0,
    memory_mb: float = 0.0,
    memory_rate: float = 1.0,
    fault_seed: int = 0,
) -> np.ndarray:
    """Sleep ``duration`` s, spin ``cpu`` s, then return a noisy quadratic bowl around 0.3.

    ``memory_mb`` is held while the model runs, by the ``memory_rate`` share of trials
    (an independent per-trial draw; by default every trial).
    """
    draw = fault_draw(params, fault_seed)
    heavy = memory_mb > 0 and fault_draw(params, fault_seed, stream=1) < memory_rate
    ballast = np.ones(int(memory_mb * 2**20) // 8) if heavy else None
    if draw < error_rate:
        raise SyntheticModelError(f"injected failure (draw {draw:.3f} < error_rate {error_rate})")
    if draw < error_rate + hang_rate:
        time.sleep(hang_seconds)
    if duration > 0:
        time.sleep(duration)
    if cpu > 0:
        _spin(cpu)
    rng = np.random.default_rng(seed)
    level = sum((value - 0.3) ** 2 for value in params.values())
    values = level + rng.normal(0.0, 0.01, OUTPUT_LENGTH)
    if error_rate + hang_rate <= draw < error_rate + hang_rate + nan_rate:
        values[:] = np.nan
    del ballast
    return values


def observed() -> np.ndarray:
    """The synthetic target: zeros, so the loss is minimal at every parameter = 0.3."""
    return np.zeros(OUTPUT_LENGTH)
