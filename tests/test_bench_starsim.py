"""``simcal bench --starsim``: simcal and ss.Calibration on Starsim's SIR example."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import require, run_simcal
from simcal.bench.starsim import _startup

try:
    import starsim
except ImportError:  # the `starsim` extra; CI installs it with the test extra
    starsim = None


def test_startup_is_cluster_start_to_the_study_line() -> None:
    log = (
        "2026-12-06 20:43:54,933 INFO simcal.cluster: starting a local cluster of 2 worker\n"
        "2026-12-06 20:43:57,559 INFO simcal.cluster: connected to scheduler tcp://x\n"
        "2026-12-06 20:44:03,043 INFO simcal.driver: study s: 0 of 4 trials already done\n"
    )
    assert _startup(log) == 8.11
    assert _startup("no such lines") is None


def test_quick_bench_runs_both_tools_and_writes_the_table(tmp_path: Path) -> None:
    require(starsim is not None, "starsim is not installed (pip install simcal[starsim])")
    done = run_simcal(
        "bench", "--starsim", "1", "--starsim-replicates", "2", "--quick", "--out", str(tmp_path),
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (result,) = json.loads((tmp_path / "starsim.json").read_text())["comparisons"]
    assert result["settings"]["replicates"] == 2
    tools = [run["tool"] for run in result["runs"]]
    assert tools == ["simcal", "ss.Calibration"]  # seed 1: simcal first, then alternating
    simcal_run, starsim_run = result["runs"]
    assert simcal_run["trials"] == starsim_run["trials"] == result["settings"]["trials"]
    for run in result["runs"]:
        assert set(run["best_params"]) == {"beta", "gamma"}
        assert 0 < run["best_params"]["beta"] < 0.15 and run["wall_seconds"] > 0
    assert simcal_run["startup_seconds"] > 0
    assert set(simcal_run["covered"]) == {"beta", "gamma"}
    assert simcal_run["effective_sample_size"] >= 1  # what the interval rests on, in the table
    table = (tmp_path / "starsim.md").read_text()
    assert "| ss.Calibration | 1 |" in table and "(ESS " in table
    assert result["medians"]["wall_ratio_simcal_over_starsim"] > 0


def test_replicate_counts_are_checked() -> None:
    done = run_simcal("bench", "--starsim", "1", "--starsim-replicates", "5,0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'5,0': a comma list of replicate counts of at least 1" in done.stderr
