"""``simcal bench --storages``, ``--installs`` and ``--scale`` at their smallest sizes (the modes
run and report; the real measurements are in docs/performance.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna

from conftest import run_simcal


def test_scale_mode_runs_the_scheduler_in_its_own_process_and_reports(tmp_path: Path) -> None:
    result = run_simcal("bench", "--scale", "--quick", "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "scale.json").read_text())
    assert report["completed"] + report["failed"] == report["trials"] == 30
    assert report["slots"] == 8 and report["ideal_trials_per_minute"] == 1200.0
    assert report["driver_cpu_ms_per_trial"] > 0 and report["scheduler_cpu_ms_per_task"] > 0
    assert "driver.py" in Path(report["profile"]).read_text()  # the driver's own profile
    assert report["drivers"] == 1 and report["told_by_driver"] == [30] and report["surplus"] == 0


def test_scale_mode_with_two_drivers_shares_one_budget(tmp_path: Path) -> None:
    """--drivers 2: this process and a `simcal run` process on one study; together they tell
    exactly the budget, each some of it; a race at its end may leave one surplus trial (asked,
    never run, not counted), reported apart."""
    result = run_simcal(
        "bench", "--scale", "--quick", "--drivers", "2", "--out", str(tmp_path), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "scale.json").read_text())
    told = report["completed"] + report["failed"]
    assert told == 30 and sum(report["told_by_driver"]) == told and report["surplus"] <= 1
    assert len(report["told_by_driver"]) == 2 and min(report["told_by_driver"]) > 0


def test_the_scale_report_counts_trials_as_the_budget_does() -> None:
    """A surplus trial (told failed and interrupted, never run) is reported apart: the drivers'
    stats leave it out, so the report's told must too, or two drivers' sum falls one short."""
    from simcal.bench.scale import told_trials
    from simcal.trials import FAIL_REASON, INTERRUPTED, SURPLUS

    study = optuna.create_study()
    for x in range(3):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=float(x)))
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL, user_attrs={FAIL_REASON: "simulation_error"}
        )
    )
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL,
            user_attrs={FAIL_REASON: INTERRUPTED, SURPLUS: True},
        )
    )
    completed, told, surplus = told_trials(study.get_trials())
    assert (len(completed), told, surplus) == (3, 4, 1)


def test_storages_mode_compares_storages_side_by_side(tmp_path: Path) -> None:
    result = run_simcal(
        "bench", "--storages", "memory,sqlite", "--quick", "--out", str(tmp_path), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "storages.json").read_text())["summary"]
    assert [row["storage"] for row in summary] == ["memory", "sqlite"]
    assert all(row["efficiency"] > 0 for row in summary)
    assert "| sqlite |" in (tmp_path / "storages.md").read_text()


def test_storages_mode_refuses_an_unknown_storage(tmp_path: Path) -> None:
    result = run_simcal("bench", "--storages", "memory,redis", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "--storages: unknown storage 'redis'" in result.stderr
    result = run_simcal("bench", "--storages", "postgresql", "--out", str(tmp_path))
    assert result.returncode == 2 and "needs --postgres-url" in result.stderr


def test_installs_mode_pairs_python_environments(tmp_path: Path) -> None:
    """--installs: each environment runs the workload in its own process, alternating; the
    report names each one's Optuna, its fast path and its ratio to the first."""
    python = sys.executable
    result = run_simcal(
        "bench", "--installs", f"a={python},b={python}", "--quick", "--out", str(tmp_path),
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "installs.json").read_text())
    assert [row["install"] for row in report["rows"]] == ["a", "b"]
    summary = report["summary"]
    assert [row["install"] for row in summary] == ["a", "b"]
    assert all(row["fast_path"] and row["optuna"] == optuna.__version__ for row in summary)
    assert all(row["efficiency"] > 0 for row in summary) and summary[0]["ratio"] == 1.0
    assert "| b | " + optuna.__version__ in (tmp_path / "installs.md").read_text()


def test_installs_mode_refuses_bad_installs(tmp_path: Path) -> None:
    result = run_simcal("bench", "--installs", f"a={sys.executable}", "--out", str(tmp_path))
    assert result.returncode == 2 and "--installs: give at least two installs" in result.stderr
    result = run_simcal("bench", "--installs", "a=/nonexistent/python,b=/bin/true")
    assert result.returncode == 2
    assert "--installs: '/nonexistent/python' is not an executable Python" in result.stderr
    assert "Traceback" not in result.stderr
