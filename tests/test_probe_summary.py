"""``check-config --probe`` summarizes each model output in one line instead of its values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from simcal.cli import main
from simcal.models.seir import simulate
from simcal.probe import summarize_outputs


def test_check_config_probe_summarizes_each_output(tmp_path: Path, capsys: Any) -> None:
    config = {
        "study": "probe-summary",
        "model": "simcal.models.seir:simulate",
        "parameters": {"beta": {"low": 0.1, "high": 1.0}, "gamma": {"low": 0.05, "high": 0.5}},
        "targets": [{"name": "incidence", "observed": "simcal.models.seir:observed"}],
        "storage": f"sqlite:///{tmp_path / 'probe.db'}",
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config), "utf-8")
    assert main(["check-config", "--probe", str(path)]) == 0
    out = capsys.readouterr().out
    probe = json.loads(out)["probe"]
    (line,) = probe["summary"].values()
    values = simulate({"beta": 0.55, "gamma": 0.275}, 0)["incidence"]
    assert line.startswith(f"shape {values.shape}, min ") and ", max " in line
    assert line.endswith(", ...") and line.count(",") < 12
    assert len(out.splitlines()) < 80  # a page, not one line per value


def test_summary_names_shape_range_first_values_and_non_finite() -> None:
    summary = summarize_outputs({
        "cases": np.arange(200.0).reshape(100, 2),
        "": np.array([np.nan, 2.0, 1.0]),
        "bad": np.array([np.inf]),
    })
    assert summary == {
        "cases": "shape (100, 2), min 0, max 199, first 0, 1, 2, 3, 4, ...",
        "<array>": "shape (3,), min 1, max 2 (1 not finite), first nan, 2, 1",
        "bad": "shape (1,), no finite value (1 not finite), first inf",
    }
