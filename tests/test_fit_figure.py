"""The fit figure draws what the loss compared, for every target form: observed points at
their times (or dates), the model's summary at the model's times, both on one scale (binomial
data as proportions, or counts), and a visible 5-95 % band. The coordinates are read back
from the matplotlib Axes; the summaries come from the workers' own aggregation function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.lines import Line2D
from optuna.distributions import FloatDistribution

from simcal.config import TargetSpec
from simcal.reporting.figures import fit_axes
from simcal.targets import load_target_data, make_objective
from simcal.tasks import FIT_ATTR_PREFIX, aggregate, run_replicate

N = 200  # people surveyed at each observation
DAYS = [20, 40, 80]


def prevalence(day: np.ndarray, scale: float) -> np.ndarray:
    """The share infected on ``day`` (rises, then falls): what the test model simulates."""
    return np.clip(scale * np.sin(np.pi * day / 120), 0.01, 0.99)


def model(params: dict[str, float], seed: int, *, step: float = 1.0, kind: str = "probability",
          population: int = N) -> dict[str, np.ndarray]:
    """Days 0..100 by ``step``: a noisy probability, a count of ``population``, a rate."""
    rng = np.random.default_rng(seed)
    t = np.arange(0, 100 + step / 2, step)
    p = np.clip(prevalence(t, params["scale"]) + rng.normal(0, 0.02, t.size), 0, 1)
    count = rng.binomial(population, p).astype(float)
    out = {"t": t, "population": np.full(t.size, float(population))}
    out["infected"] = {"probability": p, "count": count, "rate": p * N}[kind]
    return out


def write_csv(path: Path, header: str, rows: list[str]) -> str:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


def observed_rows(days: list[float], *, dates: bool = False) -> list[str]:
    counts = np.round(prevalence(np.array(days, dtype=float), 0.75) * N).astype(int)
    first = np.datetime64("2024-03-01")
    return [f"{first + int(d) if dates else d},{c},{N}" for d, c in zip(days, counts, strict=True)]


def study_trial(target: TargetSpec, kind: str, step: float = 1.0,
                population: int = N) -> optuna.trial.FrozenTrial:
    """A completed trial whose summary the workers' ``aggregate`` computed, as in a run."""
    objective = make_objective(target)
    replicates = [
        run_replicate(model, {"scale": 0.75}, seed,
                      {"step": step, "kind": kind, "population": population})
        for seed in range(8)
    ]
    result = aggregate(target.name, target.output_key, objective.observed.values, objective,
                       *replicates)
    return optuna.trial.create_trial(
        params={"scale": 0.75}, distributions={"scale": FloatDistribution(0.1, 1.0)},
        value=result.loss, user_attrs={f"{FIT_ATTR_PREFIX}{target.name}": result.summary},
    )


def lines(ax: Any) -> dict[str, Line2D]:
    found = {str(line.get_label()): line for line in ax.get_lines()}
    found["median"] = next(v for k, v in found.items() if k.startswith("best trial #"))
    return found


def band(ax: Any) -> PolyCollection:
    (collection,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    return collection


def check_band_visible(ax: Any) -> None:
    drawn = lines(ax)
    fill = band(ax)
    assert fill.get_alpha() >= 0.25 and fill.get_zorder() < drawn["median"].get_zorder()
    assert drawn["observed"].get_zorder() > drawn["median"].get_zorder()
    edges = [line for line in ax.get_lines() if str(line.get_label()).startswith("_")]
    assert len(edges) >= 2  # q05 and q95 drawn as lines too: a zero-width band stays visible
    vertices = fill.get_paths()[0].vertices
    assert np.ptp(vertices[:, 1]) > 0


FORMS = {
    # name: (target fields, csv header, observed days, model kind, model step)
    "exact": ({"loss": "binomial_nll"}, "t,infected,n", DAYS, "probability", 1.0),
    "nearest": ({"loss": "binomial_nll", "align": "nearest"}, "t,infected,n",
                [20.2, 40.4, 79.9], "probability", 0.5),
    "asof": ({"loss": "binomial_nll", "align": "asof"}, "t,infected,n",
             [20.5, 41.5, 80.7], "probability", 2.0),
    "beta_binomial": ({"loss": "beta_binomial_nll", "dispersion": 50.0}, "t,infected,n", DAYS,
                      "probability", 1.0),
    "binomial_count": ({"loss": "binomial_nll", "simulated": "count"}, "t,infected,n", DAYS,
                       "count", 1.0),
    "poisson": ({"loss": "poisson_nll"}, "t,infected,n", DAYS, "rate", 1.0),
    "negative_binomial": ({"loss": "negative_binomial_nll", "dispersion": 20.0},
                          "t,infected,n", DAYS, "rate", 1.0),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_fit_is_drawn_at_the_data_times_on_one_scale(form: str, tmp_path: Path) -> None:
    fields, header, days, kind, step = FORMS[form]
    path = write_csv(tmp_path / "data.csv", header, observed_rows(days))
    target = TargetSpec.model_validate({"name": "infected", "observed": path, **fields})
    data = load_target_data(target)
    trial = study_trial(target, kind, step)
    ax = fit_axes(target, data, [trial], top=3)
    drawn = lines(ax)
    summary = trial.user_attrs[f"{FIT_ATTR_PREFIX}infected"]
    # the observed points at their own times, not at positions 0, 1, 2
    assert np.allclose(drawn["observed"].get_xdata(), days)
    assert ax.get_xlabel() == "time t"
    # the model's median at the model's times (every `step` days from 0 to 100)
    model_t = np.asarray(drawn["median"].get_xdata(), dtype=float)
    assert np.allclose(model_t, np.arange(0, 100 + step / 2, step))
    assert np.allclose(drawn["median"].get_ydata(), summary["median"])
    # one scale: where the data is, the model's median lies close to it
    observed_y = np.asarray(drawn["observed"].get_ydata(), dtype=float)
    median_there = np.interp(days, model_t, summary["median"])
    proportion = form in ("exact", "nearest", "asof", "beta_binomial")
    if proportion:
        assert np.allclose(observed_y, data.values / N)
        assert "proportion" in ax.get_ylabel() and "probability" in ax.get_ylabel()
        assert np.allclose(median_there, observed_y, atol=0.08)
    else:
        assert np.allclose(observed_y, data.values)
        assert "count" in ax.get_ylabel()
        assert np.allclose(median_there, observed_y, rtol=0.15, atol=5)
    check_band_visible(ax)


def test_counts_of_the_models_own_n_are_shown_as_proportions(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", "t,infected,n", observed_rows(DAYS))
    target = TargetSpec.model_validate({
        "name": "infected", "observed": path, "loss": "binomial_nll", "simulated": "count",
        "n_output": "population",
    })
    trial = study_trial(target, "count", population=10_000)  # a model of 10,000 people
    ax = fit_axes(target, load_target_data(target), [trial], top=1)
    drawn = lines(ax)
    observed_y = np.asarray(drawn["observed"].get_ydata(), dtype=float)
    assert "proportion" in ax.get_ylabel() and np.all(observed_y < 1)
    median = np.interp(DAYS, drawn["median"].get_xdata(), drawn["median"].get_ydata())
    assert np.allclose(median, observed_y, atol=0.08)


def test_dates_are_drawn_as_dates(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", "date,infected,n", observed_rows(DAYS, dates=True))
    target = TargetSpec.model_validate({
        "name": "infected", "observed": path, "loss": "binomial_nll",
        "start_date": "2024-03-01",
    })
    trial = study_trial(target, "probability")
    ax = fit_axes(target, load_target_data(target), [trial], top=1)
    drawn = lines(ax)
    expected = np.datetime64("2024-03-01", "s") + np.array(DAYS) * np.timedelta64(1, "D")
    assert list(drawn["observed"].get_xdata()) == list(expected)
    model_x = drawn["median"].get_xdata()
    assert model_x[0] == np.datetime64("2024-03-01T00:00:00")
    assert model_x[-1] == np.datetime64("2024-06-09T00:00:00")  # day 100
    assert ax.get_xlabel() == "date"
    check_band_visible(ax)


def test_data_without_times_is_compared_by_position(tmp_path: Path) -> None:
    values = prevalence(np.arange(101.0), 0.75) * N
    path = write_csv(tmp_path / "data.csv", "infected", [f"{v:.3f}" for v in values])
    target = TargetSpec.model_validate({"name": "infected", "observed": path, "loss": "mse"})
    trial = study_trial(target, "rate")
    ax = fit_axes(target, load_target_data(target), [trial], top=1)
    drawn = lines(ax)
    assert np.allclose(drawn["observed"].get_xdata(), np.arange(101))
    assert np.allclose(drawn["observed"].get_ydata(), np.round(values, 3))
    assert np.allclose(drawn["median"].get_xdata(), np.arange(101))
    assert ax.get_xlabel() == "position in the output" and ax.get_ylabel() == "infected"
    check_band_visible(ax)


def test_a_band_of_zero_width_is_still_drawn(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", "t,infected,n", observed_rows(DAYS))
    target = TargetSpec.model_validate({"name": "infected", "observed": path,
                                        "loss": "binomial_nll"})
    flat = {"x": [0, 1, 2], "t": [0.0, 50.0, 100.0], "q05": [0.3, 0.4, 0.5],
            "median": [0.3, 0.4, 0.5], "q95": [0.3, 0.4, 0.5]}
    trial = optuna.trial.create_trial(
        params={"scale": 0.5}, distributions={"scale": FloatDistribution(0.1, 1.0)},
        value=1.0, user_attrs={f"{FIT_ATTR_PREFIX}infected": flat},
    )
    ax = fit_axes(target, load_target_data(target), [trial], top=1)
    edges = [line for line in ax.get_lines() if str(line.get_label()).startswith("_")]
    assert any(np.allclose(line.get_ydata(), flat["q05"]) and line.get_linewidth() > 0
               and line.get_alpha() > 0.5 for line in edges)
