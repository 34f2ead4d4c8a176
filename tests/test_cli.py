"""The ``simcal`` command line: config errors, check-config, run summary, results."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, SIMCAL, run_simcal, write_config
from processes import free_port
from simcal import __version__
from simcal.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"simcal {__version__}"


@pytest.mark.parametrize("example", ["seir.yaml", "synthetic.yaml"])
def test_shipped_examples_are_valid(example: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(REPO / "examples" / example)]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["max_in_flight"] == "auto" and resolved["targets"]


@pytest.mark.parametrize("example", ["seir.yaml", "synthetic.yaml"])
def test_shipped_examples_pass_the_probe(example: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The probe point (the middle of every range) of a shipped example is not a failing one:
    `simcal run --config examples/X` must not stop before its first trial."""
    assert main(["check-config", "--probe", str(REPO / "examples" / example)]) == 0


BAD_CONFIGS = {
    "malformed YAML": ("study: [unclosed\n", "not valid YAML"),
    "not a mapping": ("- just\n- a list\n", "expected a mapping"),
    "unknown field": (None, "colour: Extra inputs are not permitted"),
    "low > high": (None, "parameters.x: low (2.0) must be less than high (1.0)"),
    "model does not import": (None, "model: cannot import module 'no_such_module'"),
    "missing field": (None, "targets: Field required"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_naming_the_problem(tmp_path: Path, case: str) -> None:
    text, message = BAD_CONFIGS[case]
    path = write_config(tmp_path)
    if case == "unknown field":
        path = write_config(tmp_path, colour="blue")
    elif case == "low > high":
        path = write_config(tmp_path, parameters={"x": {"low": 2.0, "high": 1.0}})
    elif case == "model does not import":
        path = write_config(tmp_path, model="no_such_module:simulate")
    elif case == "missing field":
        path = write_config(tmp_path, targets=None)
        text = path.read_text().replace("targets: null\n", "")
    if text is not None:
        path.write_text(text)
    for command in (["check-config", str(path)], ["run", "--config", str(path)]):
        result = run_simcal(*command, *(["--metrics-port", "0"] if command[0] == "run" else []))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "simcal.db").exists(), "nothing may be created before validation"


def test_run_prints_and_writes_summary_then_results_lists_trials(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, max_trials=12, model_options={"nan_rate": 0.25, "fault_seed": 2}
    )
    summary_file = tmp_path / "summary.json"
    result = run_simcal(
        "run",
        "--config",
        str(config),
        "--workers",
        "4",
        "--metrics-port",
        "0",
        "--dashboard-address",
        ":0",
        "--summary",
        str(summary_file),
    )
    assert result.returncode == 0, result.stderr
    # the exit skips the interpreter's teardown, not closing the storage: SQLite's write-ahead
    # log is in the database, which is whole on its own (to copy, to `kubectl cp`)
    assert sorted(p.name for p in tmp_path.glob("simcal.db*")) == ["simcal.db"]
    summary = json.loads(summary_file.read_text())
    assert json.loads(result.stdout) == summary
    for key in (
        "study",
        "n_trials",
        "n_completed",
        "n_failed",
        "best_params",
        "best_loss",
        "trials_per_minute",
        "errors",
    ):
        assert key in summary
    assert summary["n_trials"] == 12 == summary["n_completed"] + summary["n_failed"]
    assert summary["errors"] == ({"nan_loss": summary["n_failed"]} if summary["n_failed"] else {})
    assert set(summary["best_params"]) == {"x", "y"} and summary["trials_per_minute"] > 0
    assert "trials 12/12" in result.stderr  # progress lines when not on a terminal
    last = [line for line in result.stderr.splitlines() if "trials 12/12" in line][-1]
    shown = float(last.split("trials/min (run)")[0].split()[-1])  # the same window: the run
    assert shown == pytest.approx(summary["this_run"]["trials_per_minute"], abs=0.051), last
    readme = (REPO / "README.md").read_text()
    assert [key for key in summary if f"`{key}`" not in readme] == []  # README lists every key

    listed = run_simcal("results", "--config", str(config), "--format", "csv")
    assert listed.returncode == 0, listed.stderr
    rows = list(csv.DictReader(io.StringIO(listed.stdout)))
    assert len(rows) == 12
    assert {row["state"] for row in rows} <= {"COMPLETE", "FAIL"}
    assert all(row["fail_reason"] == "nan_loss" for row in rows if row["state"] == "FAIL")
    as_json = json.loads(run_simcal("results", "--config", str(config), "--format", "json").stdout)
    assert [row["number"] for row in as_json] == [int(row["number"]) for row in rows]


def test_results_for_unknown_study_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_simcal("results", "--config", str(config), "--study", "nope")
    assert result.returncode == 2  # bad input; the storage file does not exist either
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "simcal.db").exists()


def test_unreachable_scheduler_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_simcal(
        "run",
        "--config",
        str(config),
        "--scheduler",
        "tcp://127.0.0.1:9",
        "--metrics-port",
        "0",
        "--connect-timeout",
        "3",
    )
    assert result.returncode == 1
    assert "cannot connect to scheduler tcp://127.0.0.1:9" in result.stderr


def _finished_study(tmp_path: Path, trials: int) -> Path:
    """A config whose study already holds ``trials`` completed trials, from one earlier run."""
    import datetime

    import optuna
    from optuna.distributions import FloatDistribution

    config = write_config(tmp_path, study="done", max_trials=trials)
    study = optuna.create_study(
        study_name="done", storage=f"sqlite:///{tmp_path / 'simcal.db'}", direction="minimize"
    )
    start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    for number in range(trials):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": 0.5, "y": 0.5},
                distributions={"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)},
                value=float(number),
                user_attrs={"run_id": "first", "duration_seconds": 1.0},
            )
        )
    import sqlite3

    # two trials a minute: the study-wide rate of the earlier run
    with sqlite3.connect(tmp_path / "simcal.db") as db:
        for number in range(trials):
            begun = start + datetime.timedelta(seconds=30 * number)
            db.execute(
                "UPDATE trials SET datetime_start = ?, datetime_complete = ? WHERE number = ?",
                (str(begun), str(begun + datetime.timedelta(seconds=30)), number),
            )
    return config


def test_a_finished_study_has_nothing_to_do_and_starts_no_cluster(tmp_path: Path) -> None:
    config = _finished_study(tmp_path, 4)
    # An unreachable scheduler: reaching for it would fail the run.
    result = run_simcal(
        "run", "--config", str(config), "--scheduler", "tcp://127.0.0.1:9", "--metrics-port", "0"
    )
    assert result.returncode == 0, result.stderr
    assert (
        "nothing to do: study done has 4 of 4 trials; raise --max-trials to continue"
        in result.stderr
    )
    summary = json.loads(result.stdout)
    assert summary["n_completed"] == 4
    assert summary["trials_per_minute"] == 2.0  # the study's, not this idle run's 0
    assert summary["this_run"]["completed"] == 0


SEED_DEPENDENT_FAILURE = """
def simulate(params, seed):
    raise ArithmeticError(f"no luck with seed {seed}")  # the text varies: no streak, no probe stop
"""


def test_a_run_in_which_every_trial_failed_says_so_and_exits_3(tmp_path: Path) -> None:
    (tmp_path / "unlucky.py").write_text(SEED_DEPENDENT_FAILURE, encoding="utf-8")
    config = write_config(
        tmp_path, max_trials=3, replicates=1, model="unlucky:simulate", sampler="random"
    )
    import socket

    with socket.socket() as busy:  # the dashboard's port is taken: Dask picks another quietly
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_simcal(
            "run", "--config", str(config), "--workers", "2", "--metrics-port", "0",
            "--dashboard-address", f"127.0.0.1:{busy.getsockname()[1]}",
        )
    assert result.returncode == 3, result.stderr[-3000:]
    assert (
        "no trial completed: all 3 trials of this run failed (3 simulation_error)" in result.stderr
    )
    assert json.loads(result.stdout)["n_failed"] == 3
    # one line per failed trial, its reason and the error's first line; no Dask blocks
    lines = result.stderr.splitlines()
    failed = [line for line in lines if " failed (simulation_error): " in line]
    assert len(failed) == 3, result.stderr
    for noise in ("Compute Failed", "Traceback", "already in use"):
        assert noise not in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["check-config", "results"])
def test_a_closed_stdout_exits_quietly(tmp_path: Path, command: str) -> None:
    """``simcal results | head``: the reader went away; no traceback, the SIGPIPE status."""
    import os
    import subprocess
    import sys

    config = _finished_study(tmp_path, 3)
    argv = ["check-config", str(config)] if command == "check-config" else [
        "results", "--config", str(config)
    ]
    read, write = os.pipe()
    os.close(read)  # as `| true`: the reader is gone before simcal writes
    try:
        result = subprocess.run(
            [sys.executable, "-m", "simcal.cli", *argv], stdout=write, stderr=subprocess.PIPE,
            text=True, timeout=120, check=False,
        )
    finally:
        os.close(write)
    assert result.stderr == ""
    assert result.returncode == 141


def test_a_scheduler_name_that_does_not_resolve_says_so(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_simcal(
        "run", "--config", str(config), "--scheduler", "nosuchhost.invalid:8786",
        "--metrics-port", "0", "--connect-timeout", "2",
    )
    assert result.returncode == 1, result.stderr
    assert "the name 'nosuchhost.invalid' does not resolve" in result.stderr, result.stderr
    assert "Timed out" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["run"], ["--workers WORKERS     local cluster workers (default: 8)", "(default: 0.0)"]),
        (["results"], ["(default: csv)"]),
        ([], ["(default: INFO)"]),
    ],
)
def test_help_shows_defaults(
    command: list[str], shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    for item in shown:
        assert item in text, text
    assert "(default: None)" not in text


def test_a_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("study: [unclosed\n", encoding="utf-8")
    result = run_simcal("check-config", str(path))
    assert result.returncode == 2
    assert f'in "{path}", line 1, column 8' in result.stderr, result.stderr
    assert "<unicode string>" not in result.stderr
    assert "    study: [unclosed\n           ^" in result.stderr  # the snippet stays


def test_the_summary_is_the_last_thing_a_lingering_run_writes(tmp_path: Path) -> None:
    """A pod's log is stdout and stderr interleaved line by line (`kubectl logs`): a log line
    written while the summary is printed lands inside its JSON (a live `helm upgrade` test once
    failed to parse it). With ``--metrics-linger``, the run's last log line comes before the
    summary, and the combined output ends with the summary, whole."""
    config = write_config(tmp_path, max_trials=6)
    result = subprocess.run(
        [*SIMCAL, "run", "--config", str(config), "--workers", "2", "--dashboard-address", ":0",
         "--metrics-host", "127.0.0.1", "--metrics-port", str(free_port()),
         "--metrics-linger", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    assert lines[-1] == "}", lines[-5:]
    assert "keeping /metrics and /report up for 1s" in "\n".join(lines[:start])
    assert json.loads("\n".join(lines[start:]))["n_trials"] == 6
