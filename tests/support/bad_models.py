"""Models that return what simcal cannot use, for the bad-input tests (test-only code).

Workers import this module as ``bad_models``: the tests send it to every worker with
``Client.upload_file`` (which also reaches workers that restart later).
"""

from __future__ import annotations

from typing import Any

import numpy as np

LENGTH = 16  # like simcal.models.synthetic: observed() is 16 zeros


def observed() -> np.ndarray:
    return np.zeros(LENGTH)


def good(params: dict[str, float], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return params["x"] + rng.normal(0.0, 0.01, LENGTH)


def wrong_type(params: dict[str, float], seed: int) -> Any:
    return "sixteen numbers"


def none(params: dict[str, float], seed: int) -> Any:
    return None


def scalar(params: dict[str, float], seed: int) -> Any:
    return 3.0


def wrong_shape(params: dict[str, float], seed: int) -> np.ndarray:
    return np.zeros(LENGTH - 3)


def two_dimensional(params: dict[str, float], seed: int) -> np.ndarray:
    return np.zeros((LENGTH, 2))


def ragged(params: dict[str, float], seed: int) -> Any:
    return [[1.0, 2.0], [3.0]]


def not_numeric(params: dict[str, float], seed: int) -> Any:
    return ["a"] * LENGTH


def nan_array(params: dict[str, float], seed: int) -> np.ndarray:
    return np.full(LENGTH, np.nan)


def inf_array(params: dict[str, float], seed: int) -> np.ndarray:
    return np.full(LENGTH, np.inf)


def huge_array(params: dict[str, float], seed: int) -> np.ndarray:
    # 10**9 elements (8 GB as float64) that take no memory: a broadcast view of one zero.
    return np.broadcast_to(np.float64(0.0), (10**9,))


def empty_dict(params: dict[str, float], seed: int) -> Any:
    return {}


def wrong_key(params: dict[str, float], seed: int) -> Any:
    return {"not_y": np.zeros(LENGTH)}


def mixed(params: dict[str, float], seed: int) -> Any:
    """Misbehaves by ``x``: see :func:`expected_failure` (every replicate alike)."""
    x = params["x"]
    if x < 0.15:
        return wrong_type(params, seed)
    if x < 0.30:
        return wrong_shape(params, seed)
    if x < 0.45:
        return nan_array(params, seed)
    if x < 0.55:
        return huge_array(params, seed)
    return good(params, seed)


def expected_failure(x: float) -> tuple[str, str] | None:
    """The (fail_reason, error prefix) :func:`mixed` gives at ``x``, or None for success."""
    if x < 0.15:
        return "simulation_error", "ModelOutputError: output '<return value>' is a str"
    if x < 0.30:
        return "simulation_error", "ModelOutputError: target 'y': model output has shape (13,)"
    if x < 0.45:
        return "nan_loss", "NonFiniteLossError: target 'y': loss is nan"
    if x < 0.55:
        return "simulation_error", "ModelOutputError: output '<return value>' has 1000000000"
    return None
