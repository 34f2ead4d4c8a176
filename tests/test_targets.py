"""Targets: the strict CSV reader, time alignment, combining replicates, and bad science input.

Unit tests through the objective (no cluster): the objective is the exact object the
driver sends to ``simcal.tasks.aggregate`` on a worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import special, stats

from simcal.cli import main
from simcal.config import ConfigError, validate_config
from simcal.failures import ModelOutputError, NonFiniteLossError
from simcal.targets import ObservedDataError, make_objective
from simcal.tasks import ReplicateOutput, aggregate

BASE: dict[str, Any] = {
    "study": "targets",
    "model": "simcal.models.seir:simulate",
    "parameters": {"beta": {"low": 0.1, "high": 1.0}, "k": {"low": 1.0, "high": 50.0}},
    "replicates": 4,
    "storage": "sqlite:////nonexistent-simcal-dir/t.db",
}


def config(tmp_path: Path, csv: str | None = None, **target: Any) -> Any:
    spec = {"name": "cases", "loss": "mse", **target}
    if csv is not None:
        path = tmp_path / "observed.csv"
        path.write_text(csv, "utf-8")
        spec["observed"] = str(path)
    return validate_config({**BASE, "targets": [spec]})


def objective(tmp_path: Path, csv: str, **target: Any) -> Any:
    return make_objective(config(tmp_path, csv, **target).targets[0])


def replicate(**outputs: Any) -> ReplicateOutput:
    return ReplicateOutput({k: np.asarray(v, dtype=float) for k, v in outputs.items()}, 0.1)


# -- the CSV reader: each of these was misread silently by the old hand-written reader ----------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5,\n7,\n9,\n", "line 1: empty column name"),  # old: dropped 5 as a header
        ("cases,\n5,\n7,\n", "line 1: empty column name"),
        ("0,5\n1,7\n2,9\n", "line 1: header expected, found a number"),  # old: used the day
        ("cases\n5\n\n9\n", "line 3: blank line"),  # old: skipped the missing value
        ("t,cases\n0,5\n1,\n", "line 3: missing value in column 'cases'"),
        ("t,cases\n0,5\n1,7,3\n", "line 3: 3 fields, the header has 2"),
        ("t,cases\n0,5\n1,nan\n", "line 3: column 'cases' is not finite"),
        ("t,cases\n0,5\n0,7\n", "line 3 (t=0): times must increase strictly"),
        ("day,a,b\n0,5,1\n", "no column named 'cases' and 3 other value columns"),
        ("t,date,cases\n0,2020-01-01,5\n", "both 't' and 'date' columns"),
        ("cases\n", "no data rows after the header"),
        ("", "empty file"),
    ],
)
def test_ambiguous_csv_is_an_error_naming_the_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ObservedDataError, match=r"observed\.csv") as error:
        objective(tmp_path, text)
    assert message in str(error.value)


def test_csv_columns_time_and_n_are_read_by_name(tmp_path: Path) -> None:
    found = objective(tmp_path, "n,cases,t\n10,5,0\n20,7,2\n", loss="binomial_nll").observed
    assert found.values.tolist() == [5, 7]
    assert found.times.tolist() == [0, 2] and found.n.tolist() == [10, 20]
    only = objective(tmp_path, "day_count\n5\n7\n").observed  # the only value column
    assert only.values.tolist() == [5, 7] and only.times is None


def test_dates_count_days_from_start_date(tmp_path: Path) -> None:
    text = "date,cases\n2020-03-02,5\n2020-03-09,7\n"
    found = objective(tmp_path, text, start_date="2020-03-01").observed
    assert found.times.tolist() == [1, 8]
    with pytest.raises(ObservedDataError, match="needs the target's start_date"):
        objective(tmp_path, text)


def test_check_config_exits_2_naming_the_line(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "observed.csv").write_text("cases\n5\n\n9\n", "utf-8")
    target = {"name": "cases", "observed": str(tmp_path / "observed.csv")}
    path = tmp_path / "c.yaml"
    path.write_text(__import__("json").dumps({**BASE, "targets": [target]}), "utf-8")
    assert main(["check-config", str(path)]) == 2
    assert "observed.csv line 3: blank line" in capsys.readouterr().err


# -- bad science input is refused before anything runs ------------------------------------------


@pytest.mark.parametrize(
    ("target", "csv", "message"),
    [
        ({"weight": -1}, "cases\n1\n", "greater than or equal to 0"),
        ({"align": "closest"}, "cases\n1\n", "'exact', 'nearest' or 'asof'"),
        ({"combine": "median"}, "cases\n1\n", "'mean', 'per_replicate' or 'marginal'"),
        ({"combine": "marginal"}, "cases\n1\n", "combine: marginal needs a likelihood"),
        ({"loss": "poisson_nll"}, "cases\n1.5\n", "needs non-negative integer counts"),
        ({"loss": "negative_binomial_nll", "dispersion": 2}, "cases\n-1\n", "non-negative"),
        ({"loss": "binomial_nll"}, "cases\n1\n", "needs an 'n' column"),
        ({"loss": "binomial_nll"}, "cases,n\n5,3\n", "'n' must be an integer >= the count"),
        ({"loss": "negative_binomial_nll"}, "cases\n1\n", "needs a dispersion"),
        ({"loss": "normal_nll"}, "cases\n1\n", "normal_nll needs sd"),
        ({"loss": "beta_binomial_nll", "dispersion": {"parameter": "z"}}, "cases,n\n1,2\n", "'z'"),
        ({"loss": "binomial_nll", "simulated": "counts"}, "cases,n\n1,2\n",
         "targets.0.simulated: Input should be 'probability' or 'count'"),
        ({"loss": "poisson_nll", "simulated": "count"}, "cases\n1\n",
         "simulated: count applies to ('binomial_nll', 'beta_binomial_nll') only"),
        ({"loss": "binomial_nll", "n_output": "population"}, "cases,n\n1,2\n",
         "n_output names the model output holding n for simulated: count"),
    ],
)
def test_bad_target_exits_2(
    tmp_path: Path, capsys: Any, target: dict[str, Any], csv: str, message: str
) -> None:
    (tmp_path / "observed.csv").write_text(csv, "utf-8")
    spec = {"name": "cases", "observed": str(tmp_path / "observed.csv"), **target}
    path = tmp_path / "c.yaml"
    path.write_text(__import__("json").dumps({**BASE, "targets": [spec]}), "utf-8")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_min_replicates_must_be_below_replicates() -> None:
    target = {"name": "incidence", "observed": "simcal.models.seir:observed"}
    with pytest.raises(ConfigError, match=r"min_replicates \(4\) must be less than replicates"):
        validate_config({**BASE, "targets": [target], "pruning": {"min_replicates": 4}})


# -- alignment ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("align", "expected"),
    [("exact", [10.0, 30.0]), ("nearest", [20.0, 30.0]), ("asof", [10.0, 30.0])],
)
def test_model_time_joins_observed_time(tmp_path: Path, align: str, expected: list) -> None:
    exact = "t,cases\n0,0\n2,0\n"
    off_grid = "t,cases\n0.6,0\n2,0\n"
    goal = objective(tmp_path, exact if align == "exact" else off_grid, align=align)
    output = replicate(t=[0, 1, 2, 3], cases=[10, 20, 30, 40])
    # mse against zeros is the mean of the squared aligned values
    assert goal.evaluate([output]) == pytest.approx(np.mean(np.square(expected)))


def test_a_missing_observation_time_is_named(tmp_path: Path) -> None:
    goal = objective(tmp_path, "t,cases\n0,1\n7,1\n")
    with pytest.raises(ModelOutputError, match=r"observation time 7 \(observed.csv line 3"):
        goal.evaluate([replicate(t=[0, 1, 2], cases=[1, 1, 1])])
    asof = objective(tmp_path, "t,cases\n-1,1\n", align="asof")
    with pytest.raises(ModelOutputError, match="observation time -1"):
        asof.evaluate([replicate(t=[0, 1], cases=[1, 1])])


def test_output_without_t_is_indexed_by_day(tmp_path: Path) -> None:
    goal = objective(tmp_path, "t,cases\n1,0\n3,0\n")
    assert goal.evaluate([replicate(cases=[5, 1, 9, 2])]) == pytest.approx((1 + 4) / 2)


# -- combining replicates, and weights -----------------------------------------------------------


def test_combine_modes(tmp_path: Path) -> None:
    text = "cases\n3\n5\n"
    reps = [replicate(cases=[2, 4]), replicate(cases=[6, 8])]
    y = np.array([3, 5])
    lls = [stats.poisson.logpmf(y, r.outputs["cases"]).sum() for r in reps]
    mean = objective(tmp_path, text, loss="poisson_nll")
    per = objective(tmp_path, text, loss="poisson_nll", combine="per_replicate")
    marginal = objective(tmp_path, text, loss="poisson_nll", combine="marginal")
    assert mean.evaluate(reps) == pytest.approx(-stats.poisson.logpmf(y, [4, 6]).sum())
    assert per.evaluate(reps) == pytest.approx(-np.mean(lls))
    assert marginal.evaluate(reps) == pytest.approx(-np.log(np.mean(np.exp(lls))))
    far = [replicate(cases=[2000, 4000]), replicate(cases=[6000, 8000])]  # exp underflows
    assert np.isfinite(marginal.evaluate(far))
    expected = -(special.logsumexp([stats.poisson.logpmf(y, r.outputs["cases"]).sum()
                                    for r in far]) - np.log(2))
    assert marginal.evaluate(far) == pytest.approx(expected)


def test_dispersion_can_be_a_search_parameter(tmp_path: Path) -> None:
    goal = objective(
        tmp_path, "cases\n3\n", loss="negative_binomial_nll", dispersion={"parameter": "k"}
    )
    bound = goal.bind({"beta": 0.3, "k": 4.0})
    expected = -stats.nbinom.logpmf(3, 4.0, 4.0 / (4.0 + 5.0))
    assert bound.evaluate([replicate(cases=[5])]) == pytest.approx(expected)


def test_nan_and_negative_simulated_counts_fail_the_trial_with_a_reason(tmp_path: Path) -> None:
    goal = objective(tmp_path, "t,cases\n0,3\n1,4\n", loss="poisson_nll")
    observed = goal.observed.values
    nan = [replicate(cases=[1, np.nan])]
    with pytest.raises(NonFiniteLossError, match=r"simulated value is nan at observed.csv line 3"):
        aggregate("cases", "cases", observed, goal, *nan)
    negative = [replicate(cases=[-2, 1])]
    with pytest.raises(ModelOutputError, match=r"needs non-negative simulated counts, got -2\.0"):
        aggregate("cases", "cases", observed, goal, *negative)
    binomial = objective(tmp_path, "cases,n\n3,10\n", loss="binomial_nll")
    with pytest.raises(ModelOutputError, match=r"probability in \[0, 1\], got 1.5"):
        binomial.evaluate([replicate(cases=[1.5])])


def weekly() -> dict:
    """Observed data from a callable: values with times and trials."""
    return {"cases": [3, 5], "t": [0, 7], "n": [10, 10]}


def test_a_callable_may_return_times_and_trials() -> None:
    target = {"name": "cases", "observed": "test_targets:weekly", "loss": "binomial_nll"}
    goal = make_objective(validate_config({**BASE, "targets": [target]}).targets[0])
    assert goal.observed.times.tolist() == [0, 7] and goal.observed.n.tolist() == [10, 10]
    output = replicate(t=np.arange(10), cases=np.full(10, 0.4))
    expected = -stats.binom.logpmf([3, 5], 10, 0.4).sum()
    assert goal.evaluate([output]) == pytest.approx(expected)


# -- counts for binomial-family losses (simulated: count) ----------------------------------------


@pytest.mark.parametrize(
    ("loss", "options", "scipy_of"),
    [
        ("binomial_nll", {}, lambda p: stats.binom(20, p)),
        ("beta_binomial_nll", {"dispersion": 8.0},
         lambda p: stats.betabinom(20, p * 8.0, (1 - p) * 8.0)),
    ],
)
def test_a_simulated_count_of_the_datas_n_is_its_proportion(
    tmp_path: Path, loss: str, options: dict, scipy_of: Any
) -> None:
    """Starsim's x of n: the model counts x of the same n people the data surveyed."""
    csv = "t,cases,n\n20,5,20\n40,9,20\n"
    counts = objective(tmp_path, csv, loss=loss, simulated="count", **options)
    probabilities = objective(tmp_path, csv, loss=loss, **options)
    days = np.arange(50.0)
    x = np.where(days < 30, 4.0, 10.0)  # 4 of 20, then 10 of 20
    expected = -scipy_of(np.array([0.2, 0.5])).logpmf([5, 9]).sum()
    assert counts.evaluate([replicate(t=days, cases=x)]) == pytest.approx(expected)
    assert probabilities.evaluate([replicate(t=days, cases=x / 20)]) == pytest.approx(expected)
    # replicates are made proportions one by one, then combined as usual (mean)
    two = [replicate(t=days, cases=x - 2), replicate(t=days, cases=x + 2)]
    assert counts.evaluate(two) == pytest.approx(expected)


def test_a_simulated_count_of_the_models_own_n(tmp_path: Path) -> None:
    """A model of 10,000 people against a survey of 20: p = x / n of the model's n."""
    goal = objective(tmp_path, "t,cases,n\n1,5,20\n2,9,20\n", loss="binomial_nll",
                     simulated="count", n_output="people")
    output = replicate(t=[0, 1, 2], cases=[0, 2500, 4000], people=[10_000, 10_000, 8_000])
    expected = -stats.binom(20, [0.25, 0.5]).logpmf([5, 9]).sum()
    assert goal.evaluate([output]) == pytest.approx(expected)
    with pytest.raises(ModelOutputError, match=r"model output has no 'people'"):
        goal.evaluate([replicate(t=[0, 1, 2], cases=[0, 1, 2])])


def test_a_count_above_n_fails_the_trial_naming_the_point(tmp_path: Path) -> None:
    goal = objective(tmp_path, "t,cases,n\n0,3,10\n1,4,10\n", loss="binomial_nll",
                     simulated="count")
    with pytest.raises(ModelOutputError, match=(
        r"simulated: count needs 0 <= count <= n and n > 0 \(n from the data's 'n'\), "
        r"got count 12 of n 10 at observed.csv line 3 \(t=1\)"
    )):
        goal.evaluate([replicate(t=[0, 1], cases=[3, 12])])
    own = objective(tmp_path, "t,cases,n\n0,3,10\n", loss="binomial_nll",
                    simulated="count", n_output="people")
    with pytest.raises(ModelOutputError,
                       match=r"n from model output 'people'\), got count 1 of n 0"):
        own.evaluate([replicate(t=[0], cases=[1], people=[0])])
