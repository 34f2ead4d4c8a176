"""The functions that run on Dask workers: one model replicate, one target aggregation.

Aggregations receive their replicates as task dependencies; nothing here talks to
the scheduler, so aggregations can never deadlock waiting on other tasks.

The model and a user's loss arrive as ``module:callable`` references and are imported here,
on the worker: a worker that lacks the module fails the task with :class:`ModelImportError`
naming itself and the real exception, instead of failing to unpickle the task (which Dask
reports as a crashed worker or a cancelled dependent, and the scheduler's log alone explains).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from simcal.failures import (
    AggregationError,
    ModelImportError,
    ModelOutputError,
    NonFiniteLossError,
)
from simcal.imports import UnresolvableReferenceError, resolve_callable

WHOLE_OUTPUT = ""
MAX_OUTPUT_ELEMENTS = 10_000_000
SUMMARY_POINTS = 500
SUMMARY_QUANTILES = (0.05, 0.5, 0.95)
FIT_ATTR_PREFIX = "fit_"  # trial user attr ``fit_<target>``: a replicate summary


@dataclass(frozen=True)
class ReplicateOutput:
    """A replicate's named output arrays and the seconds its model ran."""

    outputs: dict[str, np.ndarray]
    seconds: float


@dataclass(frozen=True)
class TargetLoss:
    """One target's loss and the task-seconds its replicates and its aggregation took."""

    target: str
    loss: float
    replicate_seconds: float
    aggregation_seconds: float
    summary: dict[str, list[float]] | None = None


def _as_array(name: str, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray | list | tuple):
        raise ModelOutputError(
            f"output {name!r} is a {type(value).__name__}, expected a numpy array"
        )
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ModelOutputError(f"output {name!r} is not numeric: {exc}") from None
    if array.ndim == 0:
        raise ModelOutputError(f"output {name!r} is a scalar, expected an array")
    if array.size > MAX_OUTPUT_ELEMENTS:
        raise ModelOutputError(
            f"output {name!r} has {array.size} elements, more than the limit {MAX_OUTPUT_ELEMENTS}"
        )
    return array


def normalize_output(raw: Any) -> dict[str, np.ndarray]:
    """Check a model's return value: an array, or a dict of named arrays."""
    if isinstance(raw, Mapping):
        if not raw:
            raise ModelOutputError("model returned an empty dict")
        return {str(key): _as_array(str(key), value) for key, value in raw.items()}
    return {WHOLE_OUTPUT: _as_array("<return value>", raw)}


def worker_name() -> str:
    """The Dask worker running this task (its address), or ``"this process"`` outside one."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return "this process"
    return str(worker.name) if worker.name != worker.address else str(worker.address)


def resolve_on_worker(reference: str | Callable[..., Any]) -> Callable[..., Any]:
    """The callable a ``module:callable`` reference names, imported here; a callable as is."""
    if not isinstance(reference, str):
        return reference
    try:
        return resolve_callable(reference)  # modules are imported once per process, then cached
    except UnresolvableReferenceError:
        importlib.invalidate_caches()  # a module shipped a moment ago (simcal.shipping)
    try:
        return resolve_callable(reference)
    except UnresolvableReferenceError as exc:
        raise ModelImportError(f"worker {worker_name()}: {exc}") from None


def run_replicate(
    model: Callable[..., Any] | str,
    params: Mapping[str, float],
    seed: int,
    model_options: Mapping[str, Any],
) -> ReplicateOutput:
    """Run the model once and validate what it returned."""
    model = resolve_on_worker(model)
    start = time.perf_counter()
    raw = model(dict(params), int(seed), **dict(model_options))
    outputs = normalize_output(raw)
    return ReplicateOutput(outputs, time.perf_counter() - start)


def _select(replicate: ReplicateOutput, key: str) -> np.ndarray:
    if key in replicate.outputs:
        return replicate.outputs[key]
    if WHOLE_OUTPUT in replicate.outputs:
        return replicate.outputs[WHOLE_OUTPUT]
    raise ModelOutputError(f"model output has no {key!r}; it has {sorted(replicate.outputs)}")


def summarize_replicates(
    arrays: list[np.ndarray],
    max_points: int = SUMMARY_POINTS,
    times: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """The replicates of one output as its 5 %, 50 % and 95 % quantiles per point, bounded.

    Each replicate is flattened; at most ``max_points`` evenly spaced points are kept, ``x``
    says which (positions in the flattened output), and ``t`` their model times when
    ``times`` (one per point of the output) is given. Values keep 6 significant digits, so a
    summary is at most about 30 kB of JSON whatever the model returns.
    """
    stacked = np.stack([np.ravel(array) for array in arrays])
    size = stacked.shape[1]
    x = np.unique(np.linspace(0, size - 1, min(size, max_points)).round().astype(int))
    q05, q50, q95 = np.quantile(stacked[:, x], SUMMARY_QUANTILES, axis=0)

    def compact(values: np.ndarray) -> list[float]:
        return [float(f"{value:.6g}") for value in values]

    summary = {"x": x.tolist(), "q05": compact(q05), "median": compact(q50),
               "q95": compact(q95)}
    if times is not None and np.size(times) == size:
        summary["t"] = compact(np.ravel(times)[x])
    return summary


def _fit_series(
    loss: Any, replicates: tuple[ReplicateOutput, ...], arrays: list[np.ndarray]
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """What the fit figure shows of each replicate, and the model's times if the data has
    times and every replicate has the same (``Objective.fit_series``); else the outputs."""
    series = getattr(loss, "fit_series", None)
    if series is None:
        return arrays, None
    pairs = [series(replicate.outputs) for replicate in replicates]
    times = pairs[0][1]
    same = times is not None and all(
        t is not None and np.array_equal(t, times) for _, t in pairs[1:]
    )
    return [values for values, _ in pairs], times if same else None


def aggregate(
    target: str,
    output_key: str,
    observed: np.ndarray,
    loss: Callable[[np.ndarray, np.ndarray], float] | str,
    *replicates: ReplicateOutput,
) -> TargetLoss:
    """Stack the replicates' outputs for one target and compute its loss."""
    loss = resolve_on_worker(loss)
    start = time.perf_counter()
    evaluate = getattr(loss, "evaluate", None)  # simcal.targets.Objective: aligns and combines
    arrays = [_select(replicate, output_key) for replicate in replicates]
    for array in arrays if evaluate is None else ():
        if array.shape != observed.shape:
            raise ModelOutputError(
                f"target {target!r}: model output has shape {array.shape}, "
                f"observed data has shape {observed.shape}"
            )
    try:
        value = float(evaluate(replicates) if evaluate else loss(np.stack(arrays), observed))
    except (ModelOutputError, NonFiniteLossError):
        raise
    except Exception as exc:
        raise AggregationError(
            f"loss for target {target!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not np.isfinite(value):
        raise NonFiniteLossError(f"target {target!r}: loss is {value}")
    replicate_seconds = sum(replicate.seconds for replicate in replicates)
    shown, times = _fit_series(loss, replicates, arrays)
    summary = summarize_replicates(shown, times=times)
    return TargetLoss(target, value, replicate_seconds, time.perf_counter() - start, summary)
