"""Starsim's documented SIR example for ``simcal bench --starsim``: sim, data and both runners.

The model is examples/starsim-sir/sir.py (Starsim's user guide "Parameter identification":
500 agents, 100 days, SIR on a mixing pool, beta per day, gamma as 1 / dur_inf). The
ss.Calibration runner follows that page: ``ss.BetaBinomial`` on infected of alive at days
20, 40 and 80 (``step_containing``), ``reseed=True``, ``TPESampler(n_startup_trials=50)``;
with replicates > 1 the build function returns an ``ss.MultiSim`` as Starsim's calibration
tutorial does. Run as ``python -m simcal.bench.starsim_sir ARGS_JSON`` it calibrates with
Starsim and prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import starsim as ss  # at the top, as a user's model module: workers can preload it

from simcal.adapters.starsim import run, smoothed_prevalence

TRUE_PARAMS = {"beta": 0.05, "gamma": 0.03}
RANGES = {"beta": (0.0, 0.15), "gamma": (0.0, 0.08)}
OBSERVATION_DAYS = (20, 40, 80)
N_AGENTS = 500
START = "2025-01-01"


def make_sim() -> Any:
    sir = ss.SIR(pars=dict(init_prev=0.01, p_death=0))
    net = ss.MixingPool(beta=1, n_contacts=2)
    sim_pars = dict(n_agents=N_AGENTS, dt=ss.days(1), start=START, dur=100, verbose=0)
    return ss.Sim(pars=sim_pars, diseases=sir, networks=net)


def set_params(sim: Any, beta: float, gamma: float) -> Any:
    sim.pars.diseases.pars["beta"] = ss.perday(beta)
    sim.pars.diseases.pars["dur_inf"].set(1 / gamma)
    return sim


def simulate(params: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """The simcal model: counts per day with ``t`` and Starsim's smoothed prevalence."""
    sim = set_params(make_sim(), params["beta"], params["gamma"])
    out = run(sim, seed, infected="sir.n_infected", n="n_alive")
    out["prevalence"] = smoothed_prevalence(out["infected"], out["n"])
    return out


def synthetic_data(n_reps: int = 25) -> list[tuple[int, int, int]]:
    """(day, infected, total) at the observation days: the mean of ``n_reps`` runs at the
    truth (seeds 0, 1, ...), truncated to int, as Starsim's page makes its data."""
    runs = []
    for seed in range(n_reps):
        sim = set_params(make_sim(), **TRUE_PARAMS)
        sim.pars["rand_seed"] = seed
        sim.run()
        r = sim.results.sir
        runs.append(np.stack([r.n_susceptible, r.n_infected, r.n_recovered]))
    mean = np.mean(runs, axis=0)
    return [(d, int(mean[1, d]), int(mean[:, d].sum())) for d in OBSERVATION_DAYS]


def starsim_calibration(
    data: list[tuple[int, int, int]], workers: int, trials: int, replicates: int, seed: int
) -> dict[str, Any]:
    """Calibrate with ``ss.Calibration`` as Starsim's page does; best parameters and time."""
    import optuna
    import pandas as pd
    optuna.logging.set_verbosity(optuna.logging.CRITICAL)
    np.random.seed(seed)  # the MultiSim seeds of Starsim's tutorial come from np.random
    times = [pd.Timestamp(START) + pd.DateOffset(days=d) for d in OBSERVATION_DAYS]
    expected = pd.DataFrame(
        {"x": [x for _, x, _ in data], "n": [n for _, _, n in data]},
        index=pd.Index(times, name="t"),
    )

    def modify_sim(sim: Any, calib_pars: dict, rand_seed: int = 0) -> Any:
        # Starsim's modify_sim, unchanged: rand_seed stays 0 (its reseed value is not read)
        set_params(sim, calib_pars["beta"]["value"], calib_pars["gamma"]["value"])
        sim.pars["rand_seed"] = rand_seed
        if replicates == 1:
            return sim
        seeds = np.random.randint(0, 1e6, replicates)
        return ss.MultiSim(
            sim, iterpars=dict(rand_seed=seeds), initialize=True, debug=True, parallel=False
        )

    component = ss.BetaBinomial(
        name="SIR Disease Prevalence",
        conform="step_containing",
        expected=expected,
        extract_fn=lambda sim: pd.DataFrame(
            {"x": sim.results.sir.n_infected, "n": sim.results.n_alive},
            index=pd.Index(sim.results.timevec, name="t"),
        ),
    )
    calib = ss.Calibration(
        sim=make_sim(),
        calib_pars={name: {"low": low, "high": high} for name, (low, high) in RANGES.items()},
        build_fn=modify_sim,
        reseed=True,
        components=[component],
        total_trials=trials,
        n_workers=workers,
        verbose=False,
        sampler=optuna.samplers.TPESampler(n_startup_trials=50, seed=seed),
    )
    started = time.perf_counter()
    calib.calibrate()
    seconds = time.perf_counter() - started
    best = {k: float(v) for k, v in calib.study.best_params.items() if k in RANGES}
    return {
        "best_params": best,
        "best_loss": float(calib.study.best_value),
        "calibrate_seconds": seconds,
        "trials": len(calib.study.trials),
    }


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print(json.dumps(starsim_calibration(**args)), flush=True)
