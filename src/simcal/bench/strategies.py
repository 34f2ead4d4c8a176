"""Gather strategies: the regression, the common fix, two other per-future patterns, simcal.

Each is a :data:`simcal.driver.GatherFunction`, ``(futures, timeout) -> results`` in input
order with failures as exception values, so the driver's batch mode can run any of them.
The baselines live here, never in :class:`~simcal.service.SimulationService`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from distributed import Future, as_completed, wait

from simcal.driver import GatherFunction
from simcal.service import SimulationService

POOL_THREADS = 8


def _result(future: Future, timeout: float | None) -> object | BaseException:
    try:
        return future.result(timeout=timeout)
    except Exception as exc:  # failures as values, like SimulationService.gather
        return exc


def sequential(futures: Sequence[Future], timeout: float | None) -> list[object | BaseException]:
    """The regression: ``result()`` on each future in submission order."""
    return [_result(future, timeout) for future in futures]


def wait_then_result(
    futures: Sequence[Future], timeout: float | None
) -> list[object | BaseException]:
    """The common fix: wait for all at once, then one ``result()`` round trip per future."""
    with contextlib.suppress(TimeoutError):
        wait(list(futures), timeout=timeout)
    return sequential(futures, timeout)


def as_completed_result(
    futures: Sequence[Future], timeout: float | None
) -> list[object | BaseException]:
    """``result()`` on each future as it finishes (``distributed.as_completed``)."""
    position = {future.key: index for index, future in enumerate(futures)}
    results: list[object | BaseException] = [
        TimeoutError(f"task {future.key} did not finish in time") for future in futures
    ]
    with contextlib.suppress(TimeoutError):
        for future in as_completed(list(futures), timeout=timeout):
            results[position[future.key]] = _result(future, timeout)
    return results


def threadpool_result(
    futures: Sequence[Future], timeout: float | None
) -> list[object | BaseException]:
    """``result()`` per future from a pool of threads, the round trips overlapping."""
    with ThreadPoolExecutor(max_workers=POOL_THREADS) as pool:
        return list(pool.map(lambda future: _result(future, timeout), futures))


BASELINES: dict[str, GatherFunction] = {
    "sequential": sequential,
    "wait_then_result": wait_then_result,
    "as_completed_result": as_completed_result,
    "threadpool_result": threadpool_result,
}
SIMCAL = "simcal"


def all_strategies(service: SimulationService) -> dict[str, GatherFunction]:
    """The baselines, then ``simcal``: :meth:`SimulationService.gather`."""

    def simcal(futures: Sequence[Future], timeout: float | None) -> list[object | BaseException]:
        return service.gather(futures, timeout=timeout)

    return {**BASELINES, SIMCAL: simcal}
