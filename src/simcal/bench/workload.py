"""The benchmark workload: the synthetic model sleeping ``duration`` s per replicate.

Sleeping rather than computing keeps two cores from being the limit, so the ideal
throughput is set by the workers alone: ``60 * W / (R * d + aggregation time)`` trials/min.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from simcal.config import CalibrationConfig, validate_config
from simcal.models.synthetic import observed, simulate
from simcal.targets import mse
from simcal.tasks import aggregate, run_replicate

MODEL = "simcal.models.synthetic:simulate"
PARAMS = {"x": 0.5, "y": 0.5}


@dataclass(frozen=True)
class Workload:
    """R replicates of ``duration`` seconds each on W single-threaded workers."""

    workers: int
    duration: float
    replicates: int

    @property
    def label(self) -> str:
        return f"W={self.workers} d={self.duration:g}s R={self.replicates}"

    def model_options(self) -> dict[str, Any]:
        return {"duration": self.duration}

    def config(self, *, mode: str, seconds: float, seed: int = 0) -> CalibrationConfig:
        """A calibration that asks new trials for ``seconds``, then lets those in flight end."""
        return validate_config(
            {
                "study": f"bench-w{self.workers}-d{self.duration:g}-{mode}",
                "model": MODEL,
                "model_options": self.model_options(),
                "parameters": {name: {"low": 0.0, "high": 1.0} for name in PARAMS},
                "replicates": self.replicates,
                "seed": seed,
                "targets": [{"name": "y", "observed": "simcal.models.synthetic:observed"}],
                "mode": mode,
                "max_trials": 10_000_000,
                "max_time": seconds,
            }
        )

    def ideal_trials_per_minute(self) -> float:
        """The bound: every worker busy with replicates and aggregations, nothing else."""
        busy = self.replicates * self.duration + aggregation_seconds(self.replicates)
        return 60.0 * self.workers / busy

    def ideal_tasks_per_second(self) -> float:
        """Replicate tasks per second with every worker sleeping all the time."""
        return self.workers / self.duration


@cache
def aggregation_seconds(replicates: int, samples: int = 200) -> float:
    """Median seconds of one aggregation (the loss over ``replicates`` outputs), run here."""
    outputs = [run_replicate(simulate, PARAMS, seed, {}) for seed in range(replicates)]
    target = np.asarray(observed())
    timings = []
    for _ in range(samples):
        start = time.perf_counter()
        aggregate("y", "y", target, mse, *outputs)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def steady_rate(times: list[float], trim: float = 0.1) -> float:
    """Events per second: the slope of the count against time over the middle completions.

    The first and last ``trim`` of the events (ramp-up and drain) are left out; a
    least-squares slope is robust to the bursts batch mode produces.
    """
    ordered = sorted(times)
    low, high = int(len(ordered) * trim), int(np.ceil(len(ordered) * (1 - trim)))
    window = ordered[low:high] if high - low >= 3 else ordered
    if len(window) < 2 or window[-1] <= window[0]:
        return 0.0
    slope, _ = np.polyfit(np.asarray(window) - window[0], np.arange(len(window)), 1)
    return float(slope)
