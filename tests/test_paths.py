"""One rule for paths: relative paths inside a config (data, storage) are the config folder's,
relative paths on the command line the current directory's; every read-only command finds
the study a run wrote, from any folder."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import pytest

from conftest import run_simcal, write_config
from simcal.argtypes import resolve_study_config
from simcal.config import load_config, resolve_sqlite_path


@pytest.mark.parametrize(
    ("url", "resolved"),
    [
        ("sqlite:///sir.db", "sqlite:////base/sir.db"),
        ("sqlite:///sub/sir.db?timeout=5", "sqlite:////base/sub/sir.db?timeout=5"),
        ("sqlite:///../up.db", "sqlite:////up.db"),
        ("sqlite:////data/simcal.db", "sqlite:////data/simcal.db"),  # the chart's: absolute
        ("sqlite://", "sqlite://"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql://u:p@h/db", "postgresql://u:p@h/db"),
        ("sir.db", "sir.db"),  # not a URL: simcal.storage says what to write
    ],
)
def test_relative_sqlite_paths_resolve_against_a_base(url: str, resolved: str) -> None:
    assert resolve_sqlite_path(url, Path("/base")) == resolved


def _args(**values: object) -> argparse.Namespace:
    return argparse.Namespace(**{"config": None, "study": None, "storage": None, **values})


def test_config_storage_is_the_config_folders_and_the_command_lines_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, elsewhere = tmp_path / "sircal", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    config = write_config(project, storage="sqlite:///sir.db")
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("SIMCAL_STORAGE", raising=False)
    assert load_config(config).storage == f"sqlite:///{project / 'sir.db'}"
    relative = Path("..", "sircal", config.name)
    assert resolve_study_config(_args(config=relative)).storage == (
        f"sqlite:///{project / 'sir.db'}"
    )
    on_the_line = resolve_study_config(_args(config=relative, storage="sqlite:///mine.db"))
    assert on_the_line.storage == f"sqlite:///{elsewhere / 'mine.db'}"
    monkeypatch.setenv("SIMCAL_STORAGE", "sqlite:///env.db")
    assert resolve_study_config(_args(config=relative)).storage == (
        f"sqlite:///{elsewhere / 'env.db'}"
    )
    monkeypatch.delenv("SIMCAL_STORAGE")
    # the built-in demo (`make run`, no --config) keeps writing ./simcal.db
    assert resolve_study_config(_args()).storage == "sqlite:///simcal.db"


def test_read_only_commands_find_the_study_a_run_wrote_from_any_folder(tmp_path: Path) -> None:
    project = tmp_path / "sircal"
    project.mkdir()
    write_config(project, study="sir", storage="sqlite:///sir.db", max_trials=4, replicates=2)
    result = run_simcal(
        "run", "--config", "calibration.yaml", "--workers", "2", "--metrics-port", "0",
        "--dashboard-address", ":0", cwd=project,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (project / "sir.db").is_file()
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    for cwd, config in ((tmp_path, "sircal/calibration.yaml"),
                        (nested, "../../sircal/calibration.yaml"),
                        (project, "calibration.yaml")):
        listed = run_simcal("results", "--config", config, cwd=cwd)
        assert listed.returncode == 0, (cwd, listed.stderr)
        assert len(list(csv.DictReader(io.StringIO(listed.stdout)))) == 4
    report = run_simcal(
        "report", "--config", "sircal/calibration.yaml", "--out", "out", cwd=tmp_path
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "out" / "report.html").is_file()  # --out: the current directory's
    studies = run_simcal("studies", "--storage", "sqlite:///sircal/sir.db", cwd=tmp_path)
    assert studies.returncode == 0 and "sir" in studies.stdout, studies.stderr
    posterior = run_simcal(
        "posterior", "--config", "sircal/calibration.yaml", "--out", "post.json", cwd=tmp_path
    )
    assert "does not exist" not in posterior.stderr, posterior.stderr
    if posterior.returncode == 0:
        assert json.loads((tmp_path / "post.json").read_text())
    assert not (tmp_path / "sir.db").exists() and not (nested / "sir.db").exists()
