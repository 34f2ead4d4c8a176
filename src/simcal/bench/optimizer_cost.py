"""Optimizer cost: Optuna ask+tell time per trial as the stored study grows.

For each size, one history of completed trials is written once and copied for each
sampler, so Optuna's TPE and simcal's are measured on the same trials. Trials are told
in the order they were asked with ``in_flight`` pending, like the streaming driver, so
the constant-liar sampler sees running trials too. SQLite studies are measured through
:func:`simcal.storage.open_study` (the product's settings); only writing the history
skips the fsyncs.
"""

from __future__ import annotations

import logging
import random
import shutil
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.samplers import BaseSampler, RandomSampler, TPESampler
from optuna.trial import create_trial
from sqlalchemy import event

from simcal.samplers import make_sampler
from simcal.storage import open_study

log = logging.getLogger(__name__)

STUDY = "optimizer-cost"
DISTRIBUTIONS = {name: FloatDistribution(0.0, 1.0) for name in ("x", "y")}
SAMPLERS: dict[str, Callable[[int], BaseSampler]] = {
    "optuna-tpe": lambda seed: TPESampler(constant_liar=True, multivariate=True, seed=seed),
    "simcal-tpe": lambda seed: make_sampler("tpe", seed),
}


def _loss(params: dict[str, float]) -> float:
    return sum((value - 0.3) ** 2 for value in params.values())


def _no_fsync(connection: Any, _record: object) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA synchronous=OFF")
    cursor.close()


def _history(storage: str, directory: Path) -> optuna.Study:
    """The study the completed trials are written to (SQLite: without fsyncs)."""
    if storage == "memory":
        return optuna.create_study(study_name=STUDY, sampler=RandomSampler())
    rdb = optuna.storages.RDBStorage(f"sqlite:///{directory / 'history.db'}")
    event.listen(rdb.engine, "connect", _no_fsync)
    rdb.engine.dispose()
    return optuna.create_study(study_name=STUDY, storage=rdb, sampler=RandomSampler())


def _grow(history: optuna.Study, size: int, rng: random.Random) -> None:
    count = size - len(history.get_trials(deepcopy=False))
    params = [{name: rng.random() for name in DISTRIBUTIONS} for _ in range(count)]
    history.add_trials(
        [create_trial(params=p, distributions=DISTRIBUTIONS, value=_loss(p)) for p in params]
    )


def _copy(history: optuna.Study, storage: str, sampler: BaseSampler, path: Path) -> optuna.Study:
    if storage == "memory":
        study = optuna.create_study(study_name=STUDY, sampler=sampler)
        study.add_trials(history.get_trials(deepcopy=False))
        return study
    shutil.copyfile(path.parent / "history.db", path)
    return open_study(f"sqlite:///{path}", STUDY, sampler)


def _measure(study: optuna.Study, asks: int, in_flight: int) -> tuple[list[float], list[float]]:
    """Milliseconds of each tell and of the ask that follows it."""
    pending = deque(study.ask(DISTRIBUTIONS) for _ in range(in_flight))
    ask_ms, tell_ms = [], []
    for _ in range(asks):
        trial = pending.popleft()
        start = time.perf_counter()
        study.tell(trial, _loss(trial.params))
        told = time.perf_counter()
        pending.append(study.ask(DISTRIBUTIONS))
        ask_ms.append((time.perf_counter() - told) * 1000)
        tell_ms.append((told - start) * 1000)
    return ask_ms, tell_ms


def _row(
    storage: str, sampler: str, size: int, ask_ms: list[float], tell_ms: list[float]
) -> dict[str, Any]:
    both = [ask + tell for ask, tell in zip(ask_ms, tell_ms, strict=True)]
    return {
        "storage": storage,
        "sampler": sampler,
        "stored_trials": size,
        "asks": len(ask_ms),
        "ask_ms": statistics.median(ask_ms),
        "tell_ms": statistics.median(tell_ms),
        "ask_tell_ms": statistics.median(both),
    }


def ask_tell_cost(
    storage: str, sizes: list[int], asks: int, in_flight: int = 8, seed: int = 0
) -> list[dict[str, Any]]:
    """Median ask and tell milliseconds of every sampler after each of ``sizes`` trials."""
    rng = random.Random(seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="simcal-bench-") as directory:
        history = _history(storage, Path(directory))
        for size in sizes:
            _grow(history, size, rng)
            for name, make in SAMPLERS.items():
                study = _copy(history, storage, make(seed), Path(directory) / f"{name}.db")
                row = _row(storage, name, size, *_measure(study, asks, in_flight))
                log.info(
                    "optimizer %-6s %-10s %5d trials: ask %7.2f ms  tell %6.2f ms",
                    storage,
                    name,
                    size,
                    row["ask_ms"],
                    row["tell_ms"],
                )
                rows.append(row)
    return rows
