"""Starsim's documented SIR calibration ("Parameter identification" in Starsim's user guide)
as a simcal model: the same sim, parameters, data and beta-binomial likelihood.

``make_sim`` and ``modify_sim`` are Starsim's example (500 agents, 100 days, SIR with a
mixing pool; beta per day, gamma as 1 / dur_inf). ``simulate(params, seed)`` is the
wrapper a Starsim user writes for simcal. ``python sir.py`` rewrites ``data.csv``: the
example's synthetic data (infected of total on days 20, 40 and 80, the mean of 25 runs at
the true parameters).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import starsim as ss

from simcal.adapters.starsim import run, smoothed_prevalence

TRUE_PARAMS = {"beta": 0.05, "gamma": 0.03}
OBSERVATION_DAYS = (20, 40, 80)
N_AGENTS = 500
DATA = Path(__file__).with_name("data.csv")


def make_sim() -> ss.Sim:
    """Starsim's base sim: SIR (1 % initially infected, no deaths) on a mixing pool."""
    sir = ss.SIR(pars=dict(init_prev=0.01, p_death=0))
    net = ss.MixingPool(beta=1, n_contacts=2)
    sim_pars = dict(n_agents=N_AGENTS, dt=ss.days(1), start="2025-01-01", dur=100, verbose=0)
    return ss.Sim(pars=sim_pars, diseases=sir, networks=net)


def modify_sim(sim: ss.Sim, params: dict[str, float]) -> ss.Sim:
    """Starsim's ``modify_sim``: beta per day, the infectious duration 1 / gamma."""
    sim.pars.diseases.pars["beta"] = ss.perday(params["beta"])
    sim.pars.diseases.pars["dur_inf"].set(1 / params["gamma"])
    return sim


def simulate(params: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """One replicate: infected and alive counts per day, with t, and Starsim's smoothed
    prevalence (x + 1) / (n + 2), which ``beta_binomial_nll`` with dispersion n + 2 scores
    exactly as ``ss.BetaBinomial`` does."""
    out = run(modify_sim(make_sim(), params), seed, infected="sir.n_infected", n="n_alive")
    out["prevalence"] = smoothed_prevalence(out["infected"], out["n"])
    return out


def synthetic_data(n_reps: int = 25) -> list[tuple[int, int, int]]:
    """Starsim's synthetic data: (day, infected, total) at the observation days, from the
    mean of ``n_reps`` runs (seeds 0, 1, ...) at the true parameters, truncated to int."""
    runs = []
    for seed in range(n_reps):
        sim = modify_sim(make_sim(), TRUE_PARAMS)
        sim.pars["rand_seed"] = seed
        sim.run()
        r = sim.results.sir
        runs.append(np.stack([r.n_susceptible, r.n_infected, r.n_recovered]))
    mean = np.mean(runs, axis=0)  # S, I, R by day
    return [(d, int(mean[1, d]), int(mean[:, d].sum())) for d in OBSERVATION_DAYS]


if __name__ == "__main__":
    rows = synthetic_data()
    DATA.write_text("t,infected,n\n" + "".join(f"{d},{x},{n}\n" for d, x, n in rows))
    print(DATA.read_text(), end="")
