"""A streak of trials failing alike: the rule that stops a run burning its budget on one error.

``stop_after_failures`` (config, default 10, 0 = never): when that many consecutive trials told
by this driver fail with the same reason and the same one-line error, every later trial would
most likely fail the same way (a misnamed parameter, a missing data file the model reads), so
the run stops asking (``simcal run`` exits 3 with :attr:`FailureStreak.cause`). A completed or
pruned trial ends the streak; failures that are the cluster's rather than the model's
(timeout, a lost worker, a cancellation, a worker that joined without the model: the probe
checked every worker at the start) neither count nor end it. Only the error's text
decides "the same": an error whose message varies (a parameter value in it) never streaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from simcal.failures import FailureReason

STOP_REASON = "stop_after_failures"

# The cluster's failures, not the model's: they say nothing about the config.
NOT_THE_MODELS = frozenset(
    {
        FailureReason.TIMEOUT,
        FailureReason.WORKER_LOST,
        FailureReason.CANCELLED,
        FailureReason.MODEL_IMPORT,
    }
)


@dataclass
class FailureStreak:
    """Counts consecutive alike failures; :meth:`failed` returns the stop cause at ``limit``."""

    limit: int  # 0: never stop
    error: str = ""
    count: int = 0
    cause: str = ""

    def failed(self, reason: FailureReason, error: str) -> str | None:
        """One trial failed with ``reason`` and ``error`` (one line); the cause to stop, if
        this makes ``limit`` alike in a row, else None."""
        if reason in NOT_THE_MODELS:
            return None
        key = f"{reason.value}: {error}"
        if key == self.error:
            self.count += 1
        else:
            self.error, self.count = key, 1
        if not self.limit or self.count < self.limit:
            return None
        self.cause = (
            f"{STOP_REASON}: {self.count} consecutive trials failed with the same error "
            f"({self.error})"
        )
        return self.cause

    def succeeded(self) -> None:
        """A trial completed (or was pruned): the streak is over."""
        self.error, self.count = "", 0
