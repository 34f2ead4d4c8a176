"""Why a trial failed: the error types simcal raises and their mapping to metric reasons."""

from __future__ import annotations

from asyncio import CancelledError as AsyncioCancelledError
from concurrent.futures import CancelledError as FuturesCancelledError
from enum import StrEnum

from distributed import KilledWorker


class FailureReason(StrEnum):
    """The ``reason`` label of ``simcal_trial_errors_total`` and the trial's ``fail_reason``."""

    NAN_LOSS = "nan_loss"
    SIMULATION_ERROR = "simulation_error"
    AGGREGATION_ERROR = "aggregation_error"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    CANCELLED = "cancelled"
    MODEL_IMPORT = "model_import"


class NonFiniteLossError(ArithmeticError):
    """An aggregation computed a NaN or infinite loss."""


class AggregationError(RuntimeError):
    """The loss function failed on the replicates' outputs."""


class ModelOutputError(ValueError):
    """A model returned something simcal cannot use (type, shape, size)."""


class ModelImportError(ImportError):
    """A worker could not import the model or a loss function (the text names worker and cause)."""


# What the scheduler answers when it cannot unpickle a task graph (it lacks a module the
# graph's functions are pickled by reference from); simcal submits references, not functions,
# but a caller may still pass a function object.
GRAPH_DESERIALIZATION = "Error during deserialization of the task graph"


# The reason Dask's client gives the futures it cancels when its connection to the scheduler
# breaks (``distributed.client.FutureCancelledError.reason``): they did not fail, the scheduler
# went away (tests/test_service.py checks that Dask still says so).
CONNECTION_LOST = "scheduler-connection-lost"


def lost_with_the_scheduler(error: BaseException) -> bool:
    """Whether ``error`` is a cancellation because the client lost the scheduler, whatever the
    connection's state by the time the driver looks (a new scheduler may have taken over)."""
    return (
        isinstance(error, FuturesCancelledError)
        and getattr(error, "reason", None) == CONNECTION_LOST
    )


class ResultLostError(RuntimeError):
    """A task's result was lost with the worker holding it."""


def classify(error: BaseException) -> FailureReason:
    """Map an exception from a trial's tasks to the reason it is counted under."""
    if isinstance(error, ImportError) or GRAPH_DESERIALIZATION in str(error):
        return FailureReason.MODEL_IMPORT
    if isinstance(error, NonFiniteLossError):
        return FailureReason.NAN_LOSS
    if isinstance(error, AggregationError):
        return FailureReason.AGGREGATION_ERROR
    if isinstance(error, KilledWorker | ResultLostError):
        return FailureReason.WORKER_LOST
    if isinstance(error, TimeoutError):
        return FailureReason.TIMEOUT
    if isinstance(error, FuturesCancelledError | AsyncioCancelledError):
        return FailureReason.CANCELLED
    return FailureReason.SIMULATION_ERROR


def describe(error: BaseException) -> str:
    """A one-line description of an error, for the stored trial and logs."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:500] if text else type(error).__name__


def full_text(error: BaseException, limit: int = 4000) -> str:
    """The error's whole message (every line), for the stored trial (``simcal results``)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}"[:limit] if text else type(error).__name__
