"""Shared fixtures: a real LocalCluster of 8 single-threaded worker processes, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from distributed import Client, LocalCluster

REPO = Path(__file__).resolve().parent.parent
SIMCAL = [sys.executable, "-m", "simcal"]  # as the console script: simcal.launch first


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=8,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        host="127.0.0.1",
    ) as local:
        yield local


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster) as connected:
        connected.wait_for_workers(8, timeout=120)
        yield connected


def require(condition: object, reason: str) -> None:
    """Skip when a tool the test needs is missing, except in CI (``CI`` set, as .ci/run
    does), where every test must run: there the missing tool fails the test."""
    if not condition:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


def write_config(directory: Path, **fields: object) -> Path:
    """A config file for the synthetic model, with ``fields`` overriding the defaults."""
    config = {
        "study": "synthetic-test",
        "model": "simcal.models.synthetic:simulate",
        "model_options": {},
        "parameters": {"x": {"low": 0.0, "high": 1.0}, "y": {"low": 0.0, "high": 1.0}},
        "replicates": 3,
        "seed": 7,
        "targets": [{"name": "y", "observed": "simcal.models.synthetic:observed", "loss": "mse"}],
        "max_trials": 20,
        "storage": f"sqlite:///{directory / 'simcal.db'}",
    }
    config.update(fields)
    path = directory / "calibration.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_simcal(*args: str, timeout: float = 300, **popen: object) -> subprocess.CompletedProcess:
    """Run the ``simcal`` CLI in a subprocess (metrics off unless asked), capturing output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    env.pop("SIMCAL_STORAGE", None)
    return subprocess.run(
        [*SIMCAL, *args], capture_output=True, text=True, timeout=timeout, env=env, **popen
    )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    """A throwaway PostgreSQL server on 127.0.0.1 for the session (see tests/support/pgserver.py).

    Each test creates its own database. Missing binaries fail (``make system-deps``
    installs Debian's postgresql), so the PostgreSQL tests cannot be skipped silently.
    """
    from pgserver import postgres_bin, postgres_server

    if postgres_bin() is None:
        pytest.fail("PostgreSQL is not installed: run `make system-deps` (Debian's postgresql)")
    with postgres_server() as server:
        yield server
