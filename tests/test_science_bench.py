"""``simcal bench --posterior / --pruning``: the outputs' structure (the numbers are in docs/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from distributed import Client

from simcal.bench.science import pruning_comparison, to_markdown
from simcal.cli import main


def test_bench_posterior_writes_the_coverage_table(tmp_path: Path) -> None:
    assert main(["bench", "--posterior", "2", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "science.json").read_text("utf-8"))
    coverage = results["posterior"]
    assert coverage["seeds"] == 2 and set(coverage["coverage90"]) == {"a", "b"}
    assert all(0 <= rate <= 1 for rate in coverage["coverage90"].values())
    assert "90 % interval covers truth" in (tmp_path / "science.md").read_text("utf-8")


def test_pruning_comparison_runs_both_models_side_by_side(client: Client) -> None:
    results = pruning_comparison(client, seeds=1, trials=16)
    rows = results["rows"]
    assert [row["model"] for row in rows] == ["seir", "synthetic"]
    for row in rows:
        # the plain runs set the level, so each plain run reaches it
        assert math.isfinite(row["replicate_seconds_to_level_plain"])
        assert row["final_best_plain"] <= row["level"]
        assert 0 < row["share_pruned"] < 1, row  # pruning happened, and not to everything
        assert row["replicate_seconds_budget"] > 0
    assert "rep-s to level" in to_markdown({"pruning": results})
