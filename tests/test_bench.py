"""``simcal bench --quick``: the outputs' structure, not their speed (benchmarks are not tests)."""

from __future__ import annotations

import json

import pytest

from conftest import run_simcal
from simcal.bench.checks import check_targets
from simcal.bench.throughput import mode_names
from simcal.bench.workload import steady_rate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    result = run_simcal("bench", "--quick", "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    files = {path.suffix: path for path in out.iterdir()}
    assert set(files) == {".json", ".md", ".png"}, files
    return {
        "results": json.loads(files[".json"].read_text()),
        "markdown": files[".md"].read_text(),
        "png": files[".png"].read_bytes(),
        "stdout": result.stdout,
    }


def test_json_has_every_section(quick_run: dict) -> None:
    results = quick_run["results"]
    assert set(results) == {
        "meta", "optimizer_cost", "gather", "raw_dask", "throughput", "report_cost", "targets"
    }
    [cost] = results["report_cost"]
    assert cost["reports"] >= 1 and cost["seconds_per_report"] > 0
    assert 0 < cost["share_at_default_interval"] < cost["share_at_bench_interval"]
    assert 0 < cost["cpu_share_at_default_interval"] < cost["cpu_share_at_bench_interval"]
    assert results["meta"]["settings"]["name"] == "quick"
    assert {row["mode"] for row in results["throughput"]} == set(mode_names())
    assert {row["strategy"] for row in results["gather"]} == {
        "sequential",
        "wait_then_result",
        "as_completed_result",
        "threadpool_result",
        "simcal",
    }
    assert {(row["storage"], row["sampler"]) for row in results["optimizer_cost"]} == {
        (storage, sampler)
        for storage in ("memory", "sqlite")
        for sampler in ("optuna-tpe", "simcal-tpe")
    }
    assert results["raw_dask"] and results["raw_dask"][0]["tasks_per_second"] > 0


def test_efficiencies_are_fractions_of_the_ideal(quick_run: dict) -> None:
    for row in quick_run["results"]["throughput"]:
        assert 0 < row["efficiency"] <= 1.05, row
        assert row["failed"] == 0, row
        assert row["driver_cpu_seconds_per_trial"] > 0, row


def test_gather_costs_are_relative_to_simcal(quick_run: dict) -> None:
    for row in quick_run["results"]["gather"]:
        assert row["us_per_future"] > 0
        if row["strategy"] == "simcal":
            assert row["ratio_to_simcal"] == pytest.approx(1.0)


def test_markdown_and_png(quick_run: dict) -> None:
    markdown = quick_run["markdown"]
    for heading in ("## Targets", "## Calibration throughput", "## Gather cost per future"):
        assert heading in markdown
    assert "| W | d (s) | mode | trials/min | ideal | efficiency |" in markdown
    assert markdown in quick_run["stdout"]
    assert quick_run["png"].startswith(PNG_SIGNATURE)


def test_targets_not_measured_are_not_met() -> None:
    targets = check_targets({"throughput": [], "gather": [], "raw_dask": []})
    assert len(targets) == 7
    assert all(target["met"] is None for target in targets)


def test_steady_rate_ignores_ramp_and_drain() -> None:
    times = [0.0, 5.0, *(10.0 + i * 0.5 for i in range(40)), 40.0, 60.0]
    assert steady_rate(times) == pytest.approx(2.0, rel=0.05)
