"""simcal.adapters.starsim on a tiny real Starsim sim; its likelihood against ss.BetaBinomial."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require
from simcal.adapters.starsim import days_since_start, run, smoothed_prevalence
from simcal.likelihoods import negative_log_likelihood

try:
    import starsim as ss
except ImportError:  # the `starsim` extra; CI installs it with the test extra
    ss = None


@pytest.fixture
def starsim():
    require(ss is not None, "starsim is not installed (pip install simcal[starsim])")
    return ss


def tiny_sim(starsim, beta: float = 0.2):
    sir = starsim.SIR(pars=dict(init_prev=0.1, p_death=0, beta=starsim.perday(beta)))
    net = starsim.MixingPool(beta=1, n_contacts=2)
    pars = dict(n_agents=200, dt=starsim.days(1), start="2025-01-01", dur=10, verbose=0)
    return starsim.Sim(pars=pars, diseases=sir, networks=net)


def test_run_returns_named_results_with_days_and_uses_the_seed(starsim) -> None:
    out = run(tiny_sim(starsim), 7, infected="sir.n_infected", n="n_alive")
    assert sorted(out) == ["infected", "n", "t"]
    np.testing.assert_array_equal(out["t"], np.arange(11.0))
    assert out["infected"].shape == out["n"].shape == (11,)
    assert np.all(out["n"] == 200) and out["infected"][0] > 0
    again = run(tiny_sim(starsim), 7, infected="sir.n_infected")
    np.testing.assert_array_equal(out["infected"], again["infected"])
    others = [run(tiny_sim(starsim), s, infected="sir.n_infected")["infected"] for s in (1, 2, 3)]
    assert any(not np.array_equal(out["infected"], o) for o in others), "the seed is not used"


def test_seeds_above_starsims_range_are_reduced(starsim) -> None:
    sim = tiny_sim(starsim)
    run(sim, 2**62 + 5, infected="sir.n_infected")
    assert sim.pars["rand_seed"] == (2**62 + 5) % 2**31


def test_unknown_result_path_names_it(starsim) -> None:
    with pytest.raises(KeyError, match=r"sir\.nope"):
        run(tiny_sim(starsim), 1, infected="sir.nope")
    with pytest.raises(ValueError, match="name at least one result"):
        run(tiny_sim(starsim), 1)


def test_days_since_start_of_numbers_and_dates() -> None:
    np.testing.assert_array_equal(days_since_start([2020.0, 2021.0]), [0.0, 1.0])
    dates = np.array(["2025-01-30", "2025-02-01", "2025-03-01"], dtype="datetime64[D]")
    np.testing.assert_array_equal(days_since_start(dates.astype(object)), [0.0, 2.0, 30.0])


def test_beta_binomial_with_smoothed_prevalence_is_starsims_beta_binomial(starsim) -> None:
    import pandas as pd

    t = pd.Index(pd.to_datetime(["2025-01-21", "2025-02-10", "2025-03-22"]), name="t")
    expected = pd.DataFrame({"x": [29, 132, 435], "n": [500, 500, 500]}, index=t)
    actual = pd.DataFrame({"x": [12.0, 240.0, 470.0], "n": [500.0, 500.0, 500.0]}, index=t)
    component = starsim.BetaBinomial(
        name="prevalence", conform="none", expected=expected, extract_fn=lambda sim: actual
    )
    theirs = float(np.sum(component.compute_nll(expected, actual)))
    p = smoothed_prevalence(actual["x"].to_numpy(), actual["n"].to_numpy())
    ours = negative_log_likelihood(
        "beta_binomial_nll", p, expected["x"].to_numpy(float), n=expected["n"].to_numpy(float),
        dispersion=500 + 2,
    )
    assert ours == pytest.approx(theirs, rel=1e-9)
