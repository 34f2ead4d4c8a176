"""CachedTPESampler suggests exactly what Optuna's TPESampler does, with the same seed."""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.samplers import TPESampler
from optuna.trial import TrialState

from simcal.samplers import CachedTPESampler, make_sampler

DISTRIBUTIONS = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(1e-3, 10.0, log=True)}


def _suggestions(
    sampler: optuna.samplers.BaseSampler, trials: int, direction: str, storage: str | None
) -> list[tuple[int, dict[str, float]]]:
    """Ask with six trials pending, tell them in random order, some failed, some tied."""
    study = optuna.create_study(sampler=sampler, direction=direction, storage=storage)
    rng = random.Random(1)
    pending: list[optuna.Trial] = []
    asked = []
    for index in range(trials):
        while len(pending) < 6:
            pending.append(study.ask(DISTRIBUTIONS))
        trial = pending.pop(rng.randrange(len(pending)))
        asked.append((trial.number, trial.params))
        draw = rng.random()
        if draw < 0.1:
            study.tell(trial, state=TrialState.FAIL)
        elif draw < 0.15:
            study.tell(trial, 0.5)
        else:
            study.tell(trial, (trial.params["x"] - 0.3) ** 2 + abs(trial.params["y"] - 1.0))
        if index == 40:
            study.enqueue_trial({"x": 0.1, "y": 2.0})
    return asked


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_same_suggestions_as_optuna_in_memory(direction: str) -> None:
    def sampler(cls: type[TPESampler]) -> TPESampler:
        return cls(constant_liar=True, multivariate=True, seed=3)

    expected = _suggestions(sampler(TPESampler), 200, direction, None)
    assert _suggestions(sampler(CachedTPESampler), 200, direction, None) == expected


def test_same_suggestions_as_optuna_on_sqlite(tmp_path) -> None:
    expected = _suggestions(
        TPESampler(constant_liar=True, multivariate=True, seed=5),
        40,
        "minimize",
        f"sqlite:///{tmp_path / 'optuna.db'}",
    )
    cached = _suggestions(make_sampler("tpe", 5), 40, "minimize", f"sqlite:///{tmp_path / 's.db'}")
    assert cached == expected


def test_pruned_trials_take_optunas_path() -> None:
    """With pruned trials in the history, the cached sampler suggests exactly what Optuna's does."""

    def suggestions(sampler: optuna.samplers.BaseSampler) -> list[dict[str, float]]:
        study = optuna.create_study(sampler=sampler)
        asked = []
        for value in range(25):
            trial = study.ask(DISTRIBUTIONS)
            asked.append(trial.params)
            study.tell(trial, float(value % 7) if value % 3 else None, state=_state(value))
        return [*asked, study.ask(DISTRIBUTIONS).params]

    cached = make_sampler("tpe", 0)
    assert isinstance(cached, CachedTPESampler)
    stock = TPESampler(constant_liar=True, multivariate=True, seed=0)
    assert suggestions(cached) == suggestions(stock)


@pytest.mark.parametrize("unverified", ["version", "member"])
def test_an_unverified_optuna_falls_back_to_its_own_tpe(
    unverified: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An Optuna release not verified, or lacking a private member used: stock TPESampler."""
    import simcal.optuna_internals.guard

    monkeypatch.setattr(simcal.optuna_internals.guard, "_warned", [])
    if unverified == "version":
        monkeypatch.setattr(simcal.optuna_internals.guard, "VERIFIED_OPTUNA", ("4.9",))
    else:
        monkeypatch.delattr(TPESampler, "_compute_acquisition_func")
    with caplog.at_level("WARNING", logger="simcal.optuna_internals"):
        samplers = [make_sampler("tpe", 0), make_sampler("tpe", 1)]
    assert [type(s) for s in samplers] == [TPESampler, TPESampler]
    assert len(caplog.records) == 1, caplog.text  # one line, not one per sampler
    expected = "was not verified" if unverified == "version" else "lacks _compute_acquisition_func"
    assert expected in caplog.text and "using Optuna's TPESampler" in caplog.text


def _state(value: int) -> TrialState:
    return TrialState.COMPLETE if value % 3 else TrialState.PRUNED
