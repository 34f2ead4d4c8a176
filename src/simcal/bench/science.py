"""Calibration-science benchmarks: replicate-seconds saved by pruning, posterior coverage.

Pruning: per model (SEIR demo, synthetic) and seed, the same calibration runs without and
with ``pruning:``, side by side on one cluster. Replicate-seconds are the summed task
durations the replicates report (robust to a shared machine's load); "to reach the same
best loss" is measured at the worse of the two runs' final best losses, which both reach.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from distributed import Client
from optuna.trial import TrialState

from simcal.bench.throughput import _Silent
from simcal.config import validate_config
from simcal.driver import Calibration
from simcal.metrics import Metrics
from simcal.samplers import make_sampler
from simcal.service import SimulationService

log = logging.getLogger(__name__)

MODELS: dict[str, dict[str, Any]] = {
    "seir": {
        "model": "simcal.models.seir:simulate",
        "parameters": {"beta": {"low": 0.1, "high": 1.0}, "gamma": {"low": 0.05, "high": 0.5}},
        "targets": [{"name": "incidence", "observed": "simcal.models.seir:observed"}],
    },
    "synthetic": {
        "model": "simcal.models.synthetic:simulate",
        "model_options": {"duration": 0.01},
        "parameters": {  # the search space of examples/synthetic.yaml
            "x": {"low": 0.0, "high": 1.0},
            "y": {"low": 0.0, "high": 1.0},
            "z": {"low": 0.001, "high": 10.0, "log": True},
        },
        "targets": [{"name": "signal", "observed": "simcal.models.synthetic:observed"}],
    },
}
PRUNING = {"min_replicates": 2, "pruner": "successive_halving", "startup_trials": 10}


def _trajectory(study: optuna.Study) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative replicate-seconds, running best loss and pruned or not, in order told."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.datetime_complete
    ]
    trials.sort(key=lambda t: t.datetime_complete)
    spent = np.cumsum([float(t.user_attrs.get("task_seconds", 0.0)) for t in trials])
    losses = [t.value if t.state == TrialState.COMPLETE else math.inf for t in trials]
    pruned = np.array([t.state == TrialState.PRUNED for t in trials])
    return spent, np.minimum.accumulate(np.array(losses, dtype=np.float64)), pruned


def _spent_to_reach(spent: np.ndarray, best: np.ndarray, level: float) -> float:
    reached = np.nonzero(best <= level)[0]
    return float(spent[reached[0]]) if reached.size else math.nan


def one_calibration(
    client: Client, model: str, seed: int, trials: int, pruning: bool
) -> optuna.Study:
    """Run one calibration of ``model`` on ``client``; returns its (in-memory) study."""
    document = {
        "study": f"{model}-{seed}-{'pruned' if pruning else 'plain'}",
        **MODELS[model],
        "replicates": 8,
        "seed": seed,
        "max_trials": trials,
        "storage": "sqlite:///:memory:",
        **({"pruning": PRUNING} if pruning else {}),
    }
    config = validate_config(document)
    study = optuna.create_study(sampler=make_sampler("tpe", seed), direction="minimize")
    Calibration(
        config, SimulationService(client), study, Metrics(config.study), progress=_Silent()
    ).run()
    return study


def pruning_comparison(client: Client, seeds: int = 3, trials: int = 120) -> dict[str, Any]:
    """Replicate-seconds to the same best loss, with and without pruning, per model and seed.

    The level is the worst final best loss of the plain runs of a model: a fit every plain
    run reaches. The pruned run may ask up to twice the trials (its trials are cheaper);
    its final fit is compared at the plain run's replicate-second spend.
    """
    rows = []
    for model in MODELS:
        runs = []
        for seed in range(seeds):
            plain = _trajectory(one_calibration(client, model, seed, trials, pruning=False))
            pruned = _trajectory(one_calibration(client, model, seed, 2 * trials, pruning=True))
            runs.append((seed, plain, pruned))
        level = max(float(plain[1][-1]) for _, plain, _ in runs)
        for seed, plain, pruned in runs:
            budget = float(plain[0][-1])
            within = pruned[0] <= budget
            row = {
                "model": model,
                "seed": seed,
                "level": level,
                "replicate_seconds_to_level_plain": _spent_to_reach(plain[0], plain[1], level),
                "replicate_seconds_to_level_pruned": _spent_to_reach(pruned[0], pruned[1], level),
                "replicate_seconds_budget": budget,
                "final_best_plain": float(plain[1][-1]),
                "final_best_pruned_same_spend": float(pruned[1][within][-1]),
                "trials_plain": int(plain[0].size),
                "trials_pruned_same_spend": int(within.sum()),
                "share_pruned": float(pruned[2].mean()),
            }
            row["saving_to_level"] = 1 - (
                row["replicate_seconds_to_level_pruned"] / row["replicate_seconds_to_level_plain"]
            )
            log.info(
                "pruning %-9s seed %d: replicate-s to %.4g: %.2f vs %.2f (saving %.0f%%); "
                "best at equal spend %.4g vs %.4g",
                model,
                seed,
                level,
                row["replicate_seconds_to_level_plain"],
                row["replicate_seconds_to_level_pruned"],
                100 * row["saving_to_level"],
                row["final_best_plain"],
                row["final_best_pruned_same_spend"],
            )
            rows.append(row)
    summary = {}
    for model in MODELS:
        mine = [r for r in rows if r["model"] == model]
        plain = sum(r["replicate_seconds_to_level_plain"] for r in mine)
        pruned = sum(r["replicate_seconds_to_level_pruned"] for r in mine)
        summary[model] = {
            "saving_to_level": 1 - pruned / plain,  # of the summed replicate-seconds
            "median_best_plain": float(np.median([r["final_best_plain"] for r in mine])),
            "median_best_pruned_same_spend": float(
                np.median([r["final_best_pruned_same_spend"] for r in mine])
            ),
            "mean_share_pruned": float(np.mean([r["share_pruned"] for r in mine])),
        }
    return {"trials": trials, "replicates": 8, "pruning": PRUNING, "rows": rows, "summary": summary}


def to_markdown(results: dict[str, Any]) -> str:
    """The science sections as markdown tables."""
    lines = []
    if "pruning" in results:
        p = results["pruning"]
        lines += [
            f"## Pruning ({p['trials']} trials x {p['replicates']} replicates, "
            f"pruning {p['pruning']})",
            "",
            "| model | seed | level (same best) | rep-s to level, plain | pruned | saving | "
            "best at equal spend, plain | pruned | trials plain | pruned | share pruned |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in p["rows"]:
            lines.append(
                f"| {r['model']} | {r['seed']} | {r['level']:.4g} | "
                f"{r['replicate_seconds_to_level_plain']:.2f} | "
                f"{r['replicate_seconds_to_level_pruned']:.2f} | {r['saving_to_level']:.0%} | "
                f"{r['final_best_plain']:.4g} | {r['final_best_pruned_same_spend']:.4g} | "
                f"{r['trials_plain']} | {r['trials_pruned_same_spend']} | "
                f"{r['share_pruned']:.0%} |"
            )
        lines.append("")
        for model, s in p["summary"].items():
            lines.append(
                f"- {model}: {s['saving_to_level']:.0%} fewer replicate-seconds (summed over "
                f"seeds) to reach the same best loss; median best at equal spend "
                f"{s['median_best_plain']:.4g} without, {s['median_best_pruned_same_spend']:.4g} "
                f"with pruning; {s['mean_share_pruned']:.0%} of trials pruned"
            )
        lines.append("")
    if "posterior" in results:
        c = results["posterior"]
        lines += [
            f"## Posterior coverage ({c['seeds']} seeds, {c['trials_per_seed']} TPE trials each, "
            f"method {c['method']})",
            "",
            "| parameter | 90 % interval covers truth |",
            "|---|---|",
        ]
        for name, rate in c["coverage90"].items():
            lines.append(f"| {name} | {rate:.0%} |")
        lines += ["", f"Median effective sample size: {c['median_ess']:.0f}", ""]
    return "\n".join(lines)


def run_science(out: Path, posterior_seeds: int | None, pruning_seeds: int | None) -> int:
    """``simcal bench --posterior N / --pruning N``: run, print markdown, write JSON and .md."""
    import json

    from simcal.bench.posterior_check import coverage
    from simcal.cluster import ClusterOptions, connect

    results: dict[str, Any] = {}
    if posterior_seeds:
        results["posterior"] = coverage(seeds=posterior_seeds)
    if pruning_seeds:
        options = ClusterOptions(workers=4, dashboard_address=None, connect_timeout=300)
        with connect(options) as client:
            results["pruning"] = pruning_comparison(client, seeds=pruning_seeds)
    out.mkdir(parents=True, exist_ok=True)
    text = to_markdown(results)
    (out / "science.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "science.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0
