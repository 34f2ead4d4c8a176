"""Optuna's own dashboard (the real optuna-dashboard server) reads simcal's storage."""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from pathlib import Path

from processes import free_port, start, wait_until
from test_webapp import seir_study


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


def test_optuna_dashboard_serves_a_simcal_study(tmp_path: Path) -> None:
    storage = seir_study(tmp_path, trials=4)  # as the driver stores it, summaries included
    port = free_port()
    binary = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert binary, "optuna-dashboard is in the test extra"
    server = start(
        "optuna-dashboard", [binary, storage, "--host", "127.0.0.1", "--port", str(port)], tmp_path
    )
    try:
        def studies() -> object | None:
            assert server.alive(), server.output()[-2000:]
            try:
                return get_json(f"http://127.0.0.1:{port}/api/studies")
            except OSError:
                return None

        wait_until(lambda: studies() is not None, timeout=60, what="optuna-dashboard API")
        listed = studies()["study_summaries"]
        assert [s["study_name"] for s in listed] == ["seir-demo"]
        study_id = listed[0]["study_id"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{study_id}?after=0")
        trials = detail["trials"]
        assert len(trials) == 4 and {t["state"] for t in trials} == {"Complete"}
        attrs = {a["key"] for a in trials[0]["user_attrs"]}
        assert {"fit_incidence", "loss_incidence"} <= attrs
    finally:
        server.stop()
