"""A user's own model: shipped to workers that lack it, probed before the first trial.

The real-process tests start a ``dask scheduler`` and ``dask worker`` processes whose
``PYTHONPATH`` lacks the model, which lives in a tmp folder beside the config (the folder is
importable for the driver only, through the config), and run ``simcal run`` against them.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from optuna.trial import TrialState

from conftest import run_simcal
from processes import (
    STUDY_OPEN,
    finished,
    simcal_run,
    start_scheduler,
    start_workers,
    stopping,
    stored_trials,
    wait_until,
)
from simcal.config import ConfigError, load_config
from simcal.failures import (
    GRAPH_DESERIALIZATION,
    FailureReason,
    ModelImportError,
    classify,
)
from simcal.probe import (
    PROBE_SEEDS,
    ModelFailsError,
    ProbeError,
    probe_cluster,
    probe_locally,
    probe_parameters,
)
from simcal.shipping import local_code
from simcal.tasks import resolve_on_worker

pytestmark = pytest.mark.timeout(600)

MODEL = '''
import os
import time
from pathlib import Path

import numpy as np


def simulate(params, seed, duration=0.0, length=10):
    time.sleep(duration)
    marks = os.environ.get("MYSIR_MARKS")
    if marks:  # which worker group ran a replicate
        Path(marks, f"{os.environ.get('MYSIR_GROUP', 'first')}-{os.getpid()}").touch()
    rng = np.random.default_rng(seed)
    return {"incidence": params["beta"] * np.arange(length) + rng.normal(0, 0.1, length)}
'''


@pytest.fixture(autouse=True)
def _fresh_mysir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's ``mysir`` is its own tmp folder's: forget one imported by another test."""
    import sys

    monkeypatch.delitem(sys.modules, "mysir", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_config appends the config's folder


def _project(folder: Path, *, source: str = MODEL, **fields: object) -> Path:
    """``mysir.py``, ``incidence.csv`` and ``calibration.yaml`` in ``folder``; the config."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mysir.py").write_text(textwrap.dedent(source), encoding="utf-8")
    rows = "\n".join(str(0.5 * i) for i in range(10))
    (folder / "incidence.csv").write_text(f"incidence\n{rows}\n", encoding="utf-8")
    config = {
        "study": "mysir",
        "model": "mysir:simulate",
        "parameters": {"beta": {"low": 0.1, "high": 1.0}},
        "replicates": 2,
        "sampler": "random",
        "targets": [{"name": "incidence", "observed": "incidence.csv"}],
        "max_trials": 6,
        "storage": f"sqlite:///{folder.parent / 'simcal.db'}",
        **fields,
    }
    path = folder / "calibration.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# -- units -------------------------------------------------------------------------------------


def test_import_failures_are_classified_model_import() -> None:
    assert classify(ModelImportError("worker w: cannot import")) is FailureReason.MODEL_IMPORT
    assert classify(ModuleNotFoundError("No module named 'mysir'")) is FailureReason.MODEL_IMPORT
    assert classify(RuntimeError(GRAPH_DESERIALIZATION + ". This frequently")) is (
        FailureReason.MODEL_IMPORT
    )
    assert classify(RuntimeError("boom")) is FailureReason.SIMULATION_ERROR


def test_a_reference_that_does_not_import_raises_model_import_error() -> None:
    with pytest.raises(ModelImportError, match="cannot import module 'no_such_mysir'"):
        resolve_on_worker("no_such_mysir:simulate")


def test_relative_data_and_model_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another directory: the CSV and ``mysir`` are found beside the config."""
    config_path = _project(tmp_path / "proj")
    monkeypatch.chdir(tmp_path)  # neither file is here
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    config = load_config(config_path)
    assert config.targets[0].observed == str(tmp_path / "proj" / "incidence.csv")
    assert local_code("mysir") == tmp_path / "proj" / "mysir.py"
    assert local_code("numpy") is None  # an installed distribution is never shipped
    assert local_code("simcal") is None


def test_probe_parameters_are_range_midpoints(tmp_path: Path) -> None:
    config = load_config(
        _project(tmp_path, parameters={"beta": {"low": 0.1, "high": 1.0},
                                       "rate": {"low": 1.0, "high": 100.0, "log": True}})
    )
    assert probe_parameters(config) == {"beta": pytest.approx(0.55), "rate": pytest.approx(10.0)}


def test_local_probe_names_a_shape_mismatch(tmp_path: Path) -> None:
    config = load_config(_project(tmp_path, model_options={"length": 7}))
    with pytest.raises(ProbeError, match=r"shape \(7,\), observed data has shape \(10,\)"):
        probe_locally(config)
    config = load_config(_project(tmp_path, targets=[
        {"name": "incidence", "observed": "incidence.csv", "output": "deaths"}
    ]))
    with pytest.raises(ProbeError, match=r"no 'deaths'; it has \['incidence'\]"):
        probe_locally(config)
    ok = probe_locally(load_config(_project(tmp_path)))
    assert ok["outputs"] == {"incidence": [10]}


def test_check_config_probe_exits_2_on_a_mismatch_and_prints_the_resolved_path(
    tmp_path: Path,
) -> None:
    config = _project(tmp_path / "proj", model_options={"length": 7})
    result = run_simcal("check-config", "--probe", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "shape (7,)" in result.stderr and "Traceback" not in result.stderr
    config = _project(tmp_path / "proj")
    result = run_simcal("check-config", "--probe", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["targets"][0]["observed"] == str(tmp_path / "proj" / "incidence.csv")
    assert resolved["probe"]["outputs"] == {"incidence": [10]}


def test_a_bad_config_for_a_missing_module_still_exits_2(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot import module 'nowhere'"):
        load_config(_project(tmp_path, model="nowhere:simulate"))


# -- real processes ----------------------------------------------------------------------------


def test_local_model_is_shipped_to_workers_that_lack_it_and_to_late_joiners(
    tmp_path: Path,
) -> None:
    """Workers without ``mysir`` on their path run it; so does a worker started mid-run."""
    marks = tmp_path / "marks"
    marks.mkdir()
    config = _project(
        tmp_path / "proj", max_trials=40, model_options={"duration": 0.15}, max_in_flight=4
    )
    scheduler, address = start_scheduler(tmp_path)
    env = {"MYSIR_MARKS": str(marks)}
    with stopping(scheduler) as procs:
        procs.append(start_workers(address, tmp_path, env={**env, "MYSIR_GROUP": "first"}))
        driver = simcal_run(config, tmp_path, "--scheduler", address, "--min-workers", "1")
        procs.append(driver)
        wait_until(lambda: driver.says(STUDY_OPEN), 120, "the driver to start")
        assert "shipped module mysir" in driver.output()
        procs.append(
            start_workers(address, tmp_path, name="late", env={**env, "MYSIR_GROUP": "late"})
        )
        assert driver.wait(300) == 0, driver.output()[-3000:]
        groups = {path.name.split("-")[0] for path in marks.iterdir()}
        assert groups == {"first", "late"}, "the worker that joined later ran no replicate"
        # The team edits mysir.py and runs again on the same cluster: the workers, which
        # imported the first version, get the new one (compared by hash) and reload it.
        edited = MODEL.replace("os.environ.get('MYSIR_GROUP', 'first')", "'edited'")
        (config.parent / "mysir.py").write_text(edited, encoding="utf-8")
        again = simcal_run(config, tmp_path, "--scheduler", address, "--min-workers", "2",
                           "--max-trials", "44", name="again")
        procs.append(again)
        assert again.wait(300) == 0, again.output()[-3000:]
        assert "shipped module mysir" in again.output()
    trials = stored_trials(f"sqlite:///{tmp_path / 'simcal.db'}", "mysir")
    assert len(finished(trials)) == 44
    assert all(t.state == TrialState.COMPLETE for t in trials), [
        t.user_attrs for t in trials if t.state != TrialState.COMPLETE
    ]
    assert any(path.name.startswith("edited-") for path in marks.iterdir())


def test_model_no_worker_can_import_fails_fast_naming_worker_and_cause(tmp_path: Path) -> None:
    """``mysir`` needs ``mysir_dep``, which only the driver has: exit 1 before any trial."""
    dep = tmp_path / "driver-only"
    dep.mkdir()
    (dep / "mysir_dep.py").write_text("FACTOR = 1.0\n", encoding="utf-8")
    model = "import mysir_dep\n" + MODEL
    config = _project(tmp_path / "proj", source=model)
    scheduler, address = start_scheduler(tmp_path)
    with stopping(scheduler) as procs:
        procs.append(start_workers(address, tmp_path, nworkers=2))
        driver = simcal_run(
            config, tmp_path, "--scheduler", address, "--min-workers", "2",
            env={"PYTHONPATH": str(dep)},
        )
        procs.append(driver)
        rc = driver.wait(180)
        output = driver.output()
    assert rc == 1, output[-3000:]
    assert "2 worker(s) cannot import mysir:simulate" in output
    assert "No module named 'mysir_dep'" in output
    assert "worker tcp://127.0.0.1:" in output
    assert "Traceback" not in output
    assert stored_trials(f"sqlite:///{tmp_path / 'simcal.db'}", "mysir") == []


def test_late_worker_without_the_model_fails_trials_as_model_import(tmp_path: Path) -> None:
    """Every worker had ``mysir`` at the start (nothing shipped); one that joins without it
    fails its trials with ``model_import`` and the real exception, never ``cancelled``."""
    config = _project(
        tmp_path / "proj", max_trials=40, model_options={"duration": 0.15}, max_in_flight=4
    )
    with_model = {"PYTHONPATH": str(config.parent)}
    scheduler, address = start_scheduler(tmp_path, env=with_model)
    with stopping(scheduler) as procs:
        procs.append(start_workers(address, tmp_path, env=with_model))
        driver = simcal_run(config, tmp_path, "--scheduler", address, "--min-workers", "1")
        procs.append(driver)
        wait_until(lambda: driver.says(STUDY_OPEN), 120, "the driver to start")
        assert "shipped" not in driver.output()
        procs.append(start_workers(address, tmp_path, name="late"))
        assert driver.wait(300) == 0, driver.output()[-3000:]
    trials = stored_trials(f"sqlite:///{tmp_path / 'simcal.db'}", "mysir")
    reasons = [t.user_attrs.get("fail_reason") for t in trials if t.state == TrialState.FAIL]
    assert reasons, "no trial ran on the worker that joined without the model"
    assert set(reasons) == {"model_import"}, reasons
    errors = {t.user_attrs["error"] for t in trials if t.state == TrialState.FAIL}
    assert all("No module named 'mysir'" in e and "worker tcp://" in e for e in errors), errors
    assert np.isfinite([t.value for t in trials if t.state == TrialState.COMPLETE]).all()


# -- the probe against the session's LocalCluster ----------------------------------------------


def _synthetic(tmp_path: Path, **fields: object):
    from conftest import write_config

    return load_config(write_config(tmp_path, **fields))


def test_probe_cluster_fails_on_a_shape_mismatch_and_passes_a_fitting_model(client, tmp_path):
    from simcal.service import SimulationService

    service = SimulationService(client)
    assert probe_cluster(service, _synthetic(tmp_path)) == []  # nothing to ship
    (tmp_path / "short.csv").write_text("y\n0\n0\n0\n", encoding="utf-8")
    wrong = _synthetic(tmp_path, targets=[{"name": "y", "observed": "short.csv"}])
    with pytest.raises(ProbeError, match=r"shape \(16,\), observed data has shape \(3,\)"):
        probe_cluster(service, wrong)


def test_probe_cluster_stops_on_a_model_that_fails_alike_for_every_seed(client, tmp_path):
    """A model that raises the same exception at the probe point for every seed tried: every
    trial would fail the same way, so the run stops before the first one."""
    from simcal.service import SimulationService

    config = _synthetic(tmp_path, model_options={"error_rate": 1.0})
    with pytest.raises(ModelFailsError) as raised:
        probe_cluster(SimulationService(client), config)
    text = str(raised.value)
    assert f"raised the same exception for all {PROBE_SEEDS} seeds tried" in text
    assert "SyntheticModelError: injected failure" in text
    assert "KeyError" not in text


UNLUCKY = MODEL + """

def simulate(params, seed, **options):
    raise ArithmeticError(f"unlucky draw for seed {seed}")  # its text varies with the seed
"""


def test_probe_cluster_only_logs_an_error_that_varies_with_the_seed(client, tmp_path, caplog):
    """A failure that is not the same for every seed is the trials' business."""
    from simcal.service import SimulationService

    config = load_config(_project(tmp_path / "proj", source=UNLUCKY))
    with caplog.at_level("WARNING", logger="simcal.probe"):
        probe_cluster(SimulationService(client), config)
    assert "ArithmeticError: unlucky draw for seed" in caplog.text


MISNAMED = MODEL.replace('params["beta"]', 'params["gamma"]')


def test_a_misnamed_parameter_stops_the_run_before_any_trial_exit_2(tmp_path: Path) -> None:
    """The config names ``beta``, the model reads ``gamma``: exit 2 naming the KeyError and
    the config's parameters; no trial stored, the budget intact."""
    config = _project(tmp_path / "proj", source=MISNAMED)
    result = run_simcal(
        "run", "--config", str(config), "--workers", "2", "--metrics-port", "0",
        "--dashboard-address", ":0",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "KeyError: 'gamma'" in result.stderr
    assert "the config's parameters: beta" in result.stderr
    assert "Traceback" not in result.stderr
    assert stored_trials(f"sqlite:///{tmp_path / 'simcal.db'}", "mysir") == []


NAN_AT_3 = MODEL.replace(
    'return {"incidence": ',
    'broken = np.arange(length, dtype=float)\n'
    '    broken[3] = np.nan\n'
    '    return {"broken": broken, "incidence": ',
)


PROBE_IN_A_DRIVER = """
import json, logging, sys
from simcal.cluster import ClusterOptions, connect
from simcal.config import load_config
from simcal.probe import probe_cluster
from simcal.service import SimulationService

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    config = load_config(sys.argv[1])
    with connect(ClusterOptions(workers=1, dashboard_address=None)) as client:
        probe_cluster(SimulationService(client), config)
    print(json.dumps({"scipy": "scipy.stats" in sys.modules}))
"""


def test_the_probe_judges_the_output_on_a_worker_and_the_driver_computes_no_loss(
    tmp_path: Path,
) -> None:
    """The probe's check of its one output against the targets (here a normal likelihood,
    scipy.stats) runs on the worker that made it: the driver never imports scipy. A loss
    that is not finite at the probe point is a warning in the driver's log, not a stop."""
    import json
    import subprocess
    import sys

    targets = [
        {"name": name, "observed": "incidence.csv", "loss": "normal_nll", "sd": 1.0}
        for name in ("incidence", "broken")
    ]
    targets[1]["observed"] = "broken.csv"
    config = _project(tmp_path / "proj", source=NAN_AT_3, targets=targets)
    (tmp_path / "proj" / "broken.csv").write_text(
        (tmp_path / "proj" / "incidence.csv").read_text().replace("incidence", "broken")
    )
    script = tmp_path / "driver.py"
    script.write_text(PROBE_IN_A_DRIVER, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), str(config)], capture_output=True, text=True,
        timeout=120, check=False, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"scipy": False}, done.stderr
    assert (
        "probe: target 'broken': loss is nan: simulated value is nan at broken.csv "
        "line 5 at the probe parameters\n" in done.stderr
    ), done.stderr
