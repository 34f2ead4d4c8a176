"""Replicate-aware pruning and weighted targets, through the driver on the session cluster."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from distributed import Client
from optuna.trial import TrialState

from metric_samples import sample
from simcal.config import validate_config
from simcal.driver import Calibration
from simcal.metrics import Metrics
from simcal.samplers import make_sampler
from simcal.service import SimulationService
from simcal.storage import open_study
from simcal.trials import counted_trials


class RecordingService(SimulationService):
    """The real service, noting which replicate indices each trial submitted."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.submitted: Counter[str] = Counter()

    def submit_replicates(self, *args: Any, trial_id: str, **kwargs: Any) -> list:
        futures = super().submit_replicates(*args, trial_id=trial_id, **kwargs)
        self.submitted[trial_id] += len(futures)
        return futures


def run(client: Client, tmp_path: Path, **fields: Any) -> tuple[Any, Any, RecordingService, Any]:
    config = validate_config(
        {
            "study": "pruning",
            "model": "simcal.models.synthetic:simulate",
            "parameters": {"x": {"low": 0.0, "high": 1.0}, "y": {"low": 0.0, "high": 1.0}},
            "replicates": 4,
            "seed": 3,
            "targets": [
                {"name": "a", "observed": "simcal.models.synthetic:observed", "output": "s"},
                {
                    "name": "b",
                    "observed": "simcal.models.synthetic:observed",
                    "output": "s",
                    "weight": 0.25,
                },
            ],
            "max_trials": 24,
            "storage": f"sqlite:///{tmp_path / 'p.db'}",
            **fields,
        }
    )
    study = open_study(config.storage, config.study, make_sampler(config.sampler, config.seed))
    service = RecordingService(client)
    metrics = Metrics(config.study)
    stats = Calibration(config, service, study, metrics).run()
    return study, stats, service, metrics


def test_pruned_trials_never_run_their_other_replicates(client: Client, tmp_path: Path) -> None:
    pruning = {"min_replicates": 1, "startup_trials": 4}
    study, stats, service, metrics = run(client, tmp_path, pruning=pruning)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    assert states[TrialState.PRUNED] > 0 and states[TrialState.COMPLETE] > 0, states
    assert counted_trials(study) == 24 == len(trials)  # pruned trials count in the budget
    assert stats.pruned == states[TrialState.PRUNED]
    assert sample(metrics, "simcal_trials_total", status="pruned") == stats.pruned
    assert sample(metrics, "simcal_trials_total", status="failed") == 0
    for trial in trials:
        submitted = service.submitted[str(trial.number)]
        if trial.state == TrialState.PRUNED:
            assert submitted == 1 and trial.user_attrs["pruned_at_replicates"] == 1
            assert trial.intermediate_values == {1: trial.value}
        else:
            assert submitted == 4 and trial.state == TrialState.COMPLETE
            assert 1 in trial.intermediate_values


def test_trial_loss_is_the_weighted_sum_of_target_losses(client: Client, tmp_path: Path) -> None:
    study, stats, _, _ = run(client, tmp_path, max_trials=4)
    assert stats.completed == 4
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        assert attrs["loss_a"] == pytest.approx(attrs["loss_b"])  # same data, unweighted
        assert trial.value == pytest.approx(attrs["loss_a"] + 0.25 * attrs["loss_b"])
