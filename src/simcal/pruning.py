"""Replicate-aware pruning: the Optuna pruner that judges a trial on its first replicates.

The driver runs ``min_replicates`` replicates of a trial, reports their (weighted) loss
as the trial's intermediate value at step ``min_replicates`` and asks the pruner; a
pruned trial is told PRUNED (counted in the budget) and its other replicates never run.
"""

from __future__ import annotations

import optuna

from simcal.config import PruningSpec

PARTIAL_STAGE = "partial"


def make_pruner(spec: PruningSpec) -> optuna.pruners.BasePruner:
    """The Optuna pruner of a ``pruning:`` config block.

    ``successive_halving`` (default): keep the best third of the trials at the first rung
    (``min_resource = min_replicates``). ``median``: prune when the partial loss is worse
    than the median partial loss of earlier trials (after ``startup_trials``).
    """
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.min_replicates,
            reduction_factor=3,
            bootstrap_count=spec.startup_trials,
        )
    return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=0)
