"""The Python API (simcal.api): a notebook-style script reaching the truth on its own
LocalCluster, observed data from a DataFrame and a CSV, a ``__main__`` model running in
worker processes, the YAML round trip, clear errors, and Ctrl-C telling every asked trial."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

import simcal
from processes import start, stopping, stored_trials, wait_until
from simcal.cli import main
from simcal.config import ConfigError, load_config
from simcal.models.seir import observed as seir_observed

TRUTH = {"beta": 0.3, "gamma": 0.1}

# A modeller's script: the model is defined in the script itself (``__main__``), the data is
# a DataFrame, the script makes its own LocalCluster client; it prints one JSON line.
SCRIPT = textwrap.dedent(
    """
    import json, logging, os, sys, time
    import numpy as np
    import pandas as pd
    from distributed import Client, LocalCluster
    import simcal

    N, DAYS = 500, 100
    PIDS = sys.argv[1]
    SLOW = float(sys.argv[4])

    def simulate(params, seed):
        open(os.path.join(PIDS, str(os.getpid())), "w").close()  # which process ran it
        time.sleep(SLOW)
        rng = np.random.default_rng(seed)
        s, i = N - 10, 10
        infected = np.empty(DAYS + 1)
        for day in range(DAYS + 1):
            infected[day] = i
            new = rng.binomial(s, 1 - np.exp(-params["beta"] * i / N))
            s, i = s - new, i + new - rng.binomial(i, params["gamma"])
        return {"t": np.arange(DAYS + 1.0), "infected": infected / N}

    if __name__ == "__main__":
        logging.basicConfig(level=logging.INFO)
        truth = {"beta": 0.3, "gamma": 0.1}
        days = [10, 20, 30, 40, 60, 80]
        mean = np.mean([simulate(truth, seed)["infected"] for seed in range(40)], axis=0)
        data = pd.DataFrame({"t": days, "infected": np.round(mean[days] * N), "n": N})
        cal = simcal.Calibration(
            model=simulate,
            parameters={"beta": (0.05, 0.6), "gamma": simcal.Parameter(0.02, 0.3)},
            targets=[simcal.Target("infected", observed=data, loss="beta_binomial_nll",
                                   dispersion=50.0)],
            replicates=5, max_trials=int(sys.argv[3]), study="sir", seed=1,
            storage=None if sys.argv[2] == "-" else sys.argv[2], grace_period=60,
        )
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                          host="127.0.0.1") as cluster, Client(cluster) as client:
            result = cal.run(client=client)
            print(json.dumps({
                "best_params": result.best_params, "best_loss": result.best_loss,
                "rows": len(result.trials), "stop_reason": result.stop_reason,
                "client_status": client.status, "driver_pid": os.getpid(),
                "storage": result.config.storage, "repr": repr(result),
            }))
            result.close()
    """
)


def _run_script(tmp_path: Path, max_trials: int, storage: str = "-", slow: float = 0.0):
    script = tmp_path / "calibrate.py"
    script.write_text(SCRIPT, encoding="utf-8")
    pids = tmp_path / "pids"
    pids.mkdir()
    argv = [sys.executable, str(script), str(pids), storage, str(max_trials), str(slow)]
    return start("script", argv, tmp_path, cwd=tmp_path), pids


def _last_json(text: str) -> dict:
    line = [ln for ln in text.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def test_a_notebook_style_script_reaches_the_truth_on_its_own_local_cluster(tmp_path):
    proc, pids = _run_script(tmp_path, max_trials=40)
    with stopping(proc):
        assert proc.wait(timeout=300) == 0, proc.output()[-3000:]
    out = _last_json(proc.output())
    for name, true in TRUTH.items():
        assert abs(out["best_params"][name] - true) / true < 0.2, (name, out)
    assert out["rows"] == 40
    assert out["client_status"] == "running"  # the user's client: used, never closed
    # the __main__ model went by value to the worker processes (the driver ran it only to
    # make the data, before the run)
    ran = {int(p.name) for p in pids.iterdir()}
    assert ran - {out["driver_pid"]}, ran
    # storage=None: a temporary SQLite file, removed by Result.close()
    assert out["storage"].startswith("sqlite:///")
    assert not Path(out["storage"].removeprefix("sqlite:///")).parent.exists()
    assert "best params: beta=" in out["repr"]


def test_ctrl_c_stops_the_run_and_tells_every_asked_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'sir.db'}"
    proc, _ = _run_script(tmp_path, max_trials=200, storage=storage, slow=0.3)
    with stopping(proc):
        wait_until(lambda: proc.says("trials already done"), timeout=180, what="the run")
        wait_until(
            lambda: sum(t.state.name == "COMPLETE" for t in stored_trials(storage, "sir")) >= 2,
            timeout=180,
            what="two completed trials",
        )
        proc.signal(signal.SIGINT)  # what a notebook's interrupt sends the kernel
        assert proc.wait(timeout=180) == 0, proc.output()[-3000:]
    out = _last_json(proc.output())
    assert out["stop_reason"] == "signal"
    trials = stored_trials(storage, "sir")
    assert 2 <= len(trials) < 200
    assert not [t.number for t in trials if t.state.name in ("RUNNING", "WAITING")]


@pytest.fixture(scope="module")
def small_client():
    options = {"dashboard_address": "127.0.0.1:0", "host": "127.0.0.1"}
    with LocalCluster(n_workers=2, threads_per_worker=1, **options) as cluster, Client(
        cluster
    ) as client:
        yield client


def _seir_csv(path: Path) -> Path:
    values = seir_observed()
    path.write_text(
        "incidence\n" + "".join(f"{v:.6g}\n" for v in values), encoding="utf-8"
    )
    return path


def test_csv_data_and_a_module_model_on_a_client_of_yours(tmp_path, small_client):
    csv = _seir_csv(tmp_path / "incidence.csv")
    storage = f"sqlite:///{tmp_path / 'seir.db'}"
    cal = simcal.Calibration(
        model="simcal.models.seir:simulate",
        parameters={"beta": (0.1, 1.0), "gamma": (0.05, 0.5)},
        targets=[simcal.Target("incidence", observed=str(csv))],
        replicates=2, max_trials=6, storage=storage, study="seir", seed=3,
    )
    result = cal.run(client=small_client)
    assert small_client.status == "running"
    assert result.stats.completed == 6
    trials = result.trials
    assert isinstance(trials, pd.DataFrame)
    assert list(trials["number"]) == list(range(6))
    assert {"param_beta", "param_gamma", "loss", "loss_incidence"} <= set(trials.columns)
    assert result.best_loss == trials["loss"].min()
    assert result.best_params == {
        k.removeprefix("param_"): v
        for k, v in trials.loc[trials["loss"].idxmin(), ["param_beta", "param_gamma"]].items()
    }
    figure = result.plot_fit("incidence")
    assert type(figure).__name__ == "Figure" and figure.axes
    posterior = result.posterior()
    assert posterior["study"] == "seir" and set(posterior["parameters"]) == {"beta", "gamma"}
    page = result.report(tmp_path / "report")
    assert page.name == "report.html" and "seir" in page.read_text()
    assert "best loss" in result._repr_html_() and "beta" in result._repr_html_()
    result.close()  # a storage of yours stays
    assert (tmp_path / "seir.db").exists()
    # the same study again: its budget is spent, nothing runs, nothing is lost
    again = cal.run(client=small_client)
    assert again.stats.completed == 0 and len(again.trials) == 6
    # the same study with another range: refused, showing the difference (its budget intact)
    wider = simcal.Calibration.from_config(
        cal.config.model_copy(update={"parameters": {
            "beta": simcal.Parameter(0.1, 2.0), "gamma": simcal.Parameter(0.05, 0.5)}})
    )
    with pytest.raises(ConfigError, match=r"beta.*2"):
        wider.run(client=small_client)
    widened = wider.run(client=small_client, allow_config_change=True)
    assert widened.stats.completed == 0 and len(widened.trials) == 6


def test_without_a_client_a_local_cluster_is_started_and_closed_after():
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cal = simcal.Calibration(
        model="simcal.models.synthetic:simulate",
        parameters={"x": (0.0, 1.0), "y": (0.0, 1.0)},
        targets=[simcal.Target("y", "simcal.models.synthetic:observed")],
        replicates=2, max_trials=4,
    )
    with cal.run(workers=2, progress=False, dashboard_address="127.0.0.1:0") as result:
        assert result.stats.completed == 4 and result.workers == 2
    left = [
        p for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        and "resource_tracker" not in " ".join(p.cmdline())  # multiprocessing's, for good
    ]
    # the cluster it started is closed, its worker processes gone
    assert not left, [p.cmdline() for p in left]


def test_a_client_without_enough_workers_fails_clearly(small_client):
    from simcal.cluster import ClusterError

    cal = simcal.Calibration(
        model="simcal.models.synthetic:simulate",
        parameters={"x": (0.0, 1.0), "y": (0.0, 1.0)},
        targets=[simcal.Target("y", "simcal.models.synthetic:observed")],
        min_workers=3,  # the client's cluster has 2
    )
    with pytest.raises(ClusterError, match="only 2 of the required 3 workers joined"):
        cal.run(client=small_client, connect_timeout=1)
    assert small_client.status == "running"


def test_a_lambda_model_and_inline_columns_run_by_value(small_client):
    # a lambda has no importable name: it travels by value, like a notebook's function
    model = lambda params, seed: {"y": np.full(3, params["x"])}  # noqa: E731
    cal = simcal.Calibration(
        model=model,
        parameters={"x": (0.0, 1.0)},
        targets={"name": "y", "observed": {"y": [0.5, 0.5, 0.5]}},
        replicates=1, max_trials=5, sampler="random",
    )
    assert cal.config.model is model
    with cal.run(client=small_client, progress=False) as result:
        assert result.stats.completed == 5
        assert result.best_loss == pytest.approx(min(result.trials["loss"]))


def test_a_function_from_a_local_module_is_shipped_to_workers_that_lack_it(
    tmp_path, monkeypatch, small_client
):
    import importlib

    (tmp_path / "api_local_model.py").write_text(
        "import numpy as np\n\n"
        "def simulate(params, seed):\n"
        "    return {'y': np.full(3, params['x'])}\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # the notebook's folder: here, not on workers
    module = importlib.import_module("api_local_model")
    cal = simcal.Calibration(
        model=module.simulate,
        parameters={"x": (0.0, 1.0)},
        targets=[simcal.Target("y", [0.25, 0.25, 0.25])],
        replicates=1, max_trials=3,
    )
    assert cal.config.model == "api_local_model:simulate"
    with cal.run(client=small_client, progress=False) as result:
        assert result.stats.completed == 3
    files = small_client.run(lambda: __import__("api_local_model").__file__)
    assert all(str(tmp_path) not in path for path in files.values()), files  # shipped copies


def test_a_function_importable_by_name_is_kept_as_its_reference():
    from simcal.models.seir import simulate

    cal = simcal.Calibration(
        model=simulate,
        parameters={"beta": (0.1, 1.0), "gamma": (0.05, 0.5)},
        targets=[simcal.Target("incidence", "simcal.models.seir:observed")],
    )
    assert cal.config.model == "simcal.models.seir:simulate"  # shipped and probed as the CLI


def test_yaml_round_trip(tmp_path, monkeypatch):
    frame = pd.DataFrame({"t": [1, 2, 3], "cases": [4, 5, 6], "n": [10, 10, 10]})
    _seir_csv(tmp_path / "incidence.csv")
    monkeypatch.chdir(tmp_path)  # a relative CSV path resolves against the cwd
    cal = simcal.Calibration(
        model="simcal.models.seir:simulate",
        parameters={"beta": simcal.Parameter(0.1, 1.0, log=True), "gamma": (0.05, 0.5)},
        targets=[
            simcal.Target("cases", frame, loss="binomial_nll", align="nearest"),
            simcal.Target("incidence", observed="incidence.csv"),
        ],
        replicates=3, max_trials=12, study="round-trip", storage="sqlite:///x.db",
    )
    assert cal.config.targets[1].observed == str(tmp_path / "incidence.csv")
    (tmp_path / "elsewhere").mkdir()
    path = cal.to_yaml(tmp_path / "elsewhere" / "calibration.yaml")
    assert load_config(path) == cal.config
    assert simcal.Calibration.from_yaml(path).config == cal.config
    # the CLI reads it as it is
    assert main(["check-config", str(path)]) == 0
    # storage=None writes no storage: the file names nothing temporary
    cal_temporary = simcal.Calibration(
        model="simcal.models.seir:simulate",
        parameters={"beta": (0.1, 1.0)},
        targets=[simcal.Target("incidence", "simcal.models.seir:observed")],
    )
    text = cal_temporary.to_yaml(tmp_path / "t.yaml").read_text()
    assert "storage" not in text


def test_n_names_the_trials_column_of_a_dataframe():
    frame = pd.DataFrame({"t": [1, 2], "cases": [3, 4], "tested": [10, 10]})
    target = simcal.Target("cases", frame, loss="binomial_nll", n="tested")
    assert target.observed == {"t": [1.0, 2.0], "cases": [3.0, 4.0], "n": [10.0, 10.0]}
    assert "tested" in frame.columns  # the caller's frame is left as it was
    with pytest.raises(ConfigError, match=r"n: 'total' names no column of \['t', 'cases'"):
        simcal.Target("cases", frame, loss="binomial_nll", n="total")


def test_a_main_function_cannot_be_written_to_yaml(tmp_path):
    def simulate(params, seed):  # nested: no importable name, like a notebook's function
        return np.zeros(3)

    cal = simcal.Calibration(
        model=simulate, parameters={"x": (0, 1)}, targets=[simcal.Target("y", [1.0, 2.0, 3.0])]
    )
    with pytest.raises(ConfigError, match=r"model: .*simulate.*module"):
        cal.to_yaml(tmp_path / "c.yaml")
    assert not (tmp_path / "c.yaml").exists()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: simcal.Parameter(0.5, 0.1), r"low \(0.5\) must be less than high \(0.1\)"),
        (
            lambda: simcal.Calibration(
                model="simcal.models.seir:simulate",
                parameters={"beta": (0.5, 0.1)},
                targets=[simcal.Target("incidence", "simcal.models.seir:observed")],
            ),
            r"parameters\.beta: low \(0.5\) must be less than high",
        ),
        (
            lambda: simcal.Calibration(
                model="simcal.models.seir:simulate",
                parameters={"beta": "wide"},
                targets=[simcal.Target("incidence", "simcal.models.seir:observed")],
            ),
            r"parameters\.beta: expected \(low, high\)",
        ),
        (
            lambda: simcal.Target("incidence", "simcal.models.seir:observed", loss="rmse"),
            r"target 'incidence':\n  loss: unknown loss 'rmse'",
        ),
        (
            lambda: simcal.Calibration(
                model="simcal.models.seir:simulate",
                parameters={"beta": (0.1, 1.0)},
                targets=[{"name": "incidence", "observed": [1.0], "loss": "rmse"}],
            ),
            r"targets\.0\.loss: unknown loss 'rmse'",
        ),
        (
            lambda: simcal.Calibration(
                model=42, parameters={"beta": (0.1, 1.0)},
                targets=[simcal.Target("incidence", [1.0])],
            ),
            r"model: must be 'module:callable' or a callable, not int",
        ),
        (
            lambda: simcal.Target("y", {"t": [1, 2], "y": [1.0]}),
            r"observed: .*columns differ in length",
        ),
    ],
)
def test_bad_input_raises_a_clear_error_naming_the_field(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_bad_data_in_a_dataframe_names_the_column_and_row(small_client):
    frame = pd.DataFrame({"t": [0.0, 1.0, 2.0], "incidence": [1.0, None, 3.0]})
    cal = simcal.Calibration(
        model="simcal.models.seir:simulate",
        parameters={"beta": (0.1, 1.0), "gamma": (0.05, 0.5)},
        targets=[simcal.Target("incidence", frame)],
    )
    with pytest.raises(ConfigError, match=r"inline data row 2: column 'incidence' is not finite"):
        cal.run(client=small_client)  # before anything runs on the cluster
