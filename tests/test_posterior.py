"""The approximate posterior: proposal correction, coverage on known truth, the command.

In-process: the posterior reads only stored trials, so the tests generate trials with
known proposal and likelihood and call it directly (seconds, no cluster).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from scipy import stats

from simcal.bench.posterior_check import coverage
from simcal.cli import main
from simcal.config import ParameterSpec
from simcal.posterior import Proposal, posterior

BOX = {"x": ParameterSpec(low=0.0, high=1.0)}


def proposals(n: int, seed: int = 0) -> list[Proposal]:
    """Proposals crowded at 0.7 (like TPE chasing a mode), likelihood N(0.5, 0.1)."""
    rng = np.random.default_rng(seed)
    xs = np.concatenate([rng.uniform(0, 1, n // 5), np.clip(rng.normal(0.7, 0.1, n), 0, 1)])
    return [Proposal({"x": x}, float(-stats.norm.logpdf(0.5, x, 0.1))) for x in xs]


def test_importance_weights_undo_the_crowded_proposals() -> None:
    result = posterior(proposals(4000), BOX)
    x = result["parameters"]["x"]
    # the posterior is N(0.5, 0.1) (flat prior; truncation at 0 and 1 is negligible)
    assert x["median"] == pytest.approx(0.5, abs=0.02)
    assert x["ci90"] == pytest.approx([0.5 - 0.1645, 0.5 + 0.1645], abs=0.03)
    assert x["ci50"] == pytest.approx([0.5 - 0.0674, 0.5 + 0.0674], abs=0.02)
    assert result["effective_sample_size"] > 100 and result["method"] == "importance"


def test_failed_and_pruned_trials_weigh_nothing_but_shape_q() -> None:
    crowd = proposals(2000)  # every 8th fails, independently of x
    mixed = [Proposal(p.params, None) if i % 8 == 0 else p for i, p in enumerate(crowd)]
    result = posterior(mixed, BOX)
    assert result["trials_proposed"] == len(crowd) and result["trials_completed"] == 2100
    assert result["parameters"]["x"]["median"] == pytest.approx(0.5, abs=0.03)


def test_abc_keeps_the_best_quantile() -> None:
    result = posterior(proposals(4000), BOX, method="abc", quantile=0.2)
    lo, hi = result["parameters"]["x"]["ci90"]
    assert lo > 0.3 and hi < 0.75 and result["method"] == "abc"


def test_coverage_of_the_90_interval_on_known_truth() -> None:
    result = coverage(seeds=8, trials=120)
    for name, rate in result["coverage90"].items():
        assert rate >= 0.6, (name, result["runs"])  # 20+ seeds in `simcal bench --posterior`


def _config(tmp_path: Path) -> Path:
    document: dict[str, Any] = {
        "study": "post",
        "model": "simcal.models.seir:simulate",
        "parameters": {"x": {"low": 0.0, "high": 1.0}},
        "targets": [{"name": "incidence", "observed": "simcal.models.seir:observed",
                     "loss": "poisson_nll"}],
        "storage": f"sqlite:///{tmp_path / 'p.db'}",
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(document), "utf-8")
    return path


def test_the_command_prints_and_writes_json(tmp_path: Path, capsys: Any) -> None:
    config = _config(tmp_path)
    study = optuna.create_study(study_name="post", storage=f"sqlite:///{tmp_path / 'p.db'}")
    for _ in range(60):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
        study.tell(trial, float(-stats.norm.logpdf(0.5, trial.params["x"], 0.1)))
    out = tmp_path / "posterior.json"
    assert main(["posterior", "--config", str(config), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text("utf-8"))
    assert printed["study"] == "post" and printed["method"] == "importance"
    assert set(printed["parameters"]["x"]) == {"median", "ci50", "ci90"}
    assert main(["posterior", "--config", str(config), "--out", "/nonexistent/p.json"]) == 2
    assert main(["posterior", "--config", str(config), "--study", "other"]) == 2
    err = capsys.readouterr().err
    assert "no study 'other'" in err and "studies there: post" in err
    missing = tmp_path / "missing.db"
    assert main(["posterior", "--config", str(config), "--storage", f"sqlite:///{missing}"]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.exists()  # not created



def test_a_low_ess_says_how_many_more_trials_and_how_to_run_them(
    tmp_path: Path, capsys: Any
) -> None:
    """Few trials crowded by TPE: the ESS is low, the command estimates the trials still
    needed (ESS in proportion to completed trials) and names the run that continues."""
    config = _config(tmp_path)
    study = optuna.create_study(study_name="post", storage=f"sqlite:///{tmp_path / 'p.db'}",
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    distribution = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for _ in range(20):
        trial = study.ask(distribution)
        study.tell(trial, float(-stats.norm.logpdf(0.5, trial.params["x"], 0.02)))
    assert main(["posterior", "--config", str(config)]) == 0
    printed = json.loads(capsys.readouterr().out)
    ess = printed["effective_sample_size"]
    assert ess < 30
    more = printed["more_trials_needed"]
    assert more == math.ceil(20 * 30 / ess) - 20 or abs(more - (20 * 30 / ess - 20)) <= 1
    assert printed["continue_with"] == (
        f"simcal run --config {config} --max-trials {20 + more}"
    )
    text = " ".join(printed["warnings"])
    assert f"about {more} more trials are needed" in text and "per trial" in text
    assert "continues this same study" in text
