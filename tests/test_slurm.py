"""Calibrations on a dask-jobqueue ``SLURMCluster`` whose workers are jobs of a real SLURM:
through the Python API (``Calibration.run(client=Client(cluster))``) and ``simcal run``.

The SLURM is Debian's slurm-wlm with munge, one node (this host), started by the test
(tests/support/slurm.py). Under CI a missing SLURM or dask-jobqueue fails the test.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, require, run_simcal, write_config
from processes import assert_no_loss, stored_trials
from slurm import NODE, Slurm, missing_tools, slurm_cluster

WORKERS = 3
TRUTH = 0.3  # the synthetic model's loss is least at every parameter = 0.3


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    missing = missing_tools()
    require(not missing, f"SLURM is not installed (missing {missing}): run `make system-deps`")
    require(os.geteuid() == 0, "the test SLURM runs slurmctld and slurmd as root (SlurmUser)")
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def slurm_client(slurm: Slurm) -> Iterator[object]:
    """A ``Client`` of a ``SLURMCluster`` scaled to :data:`WORKERS` single-threaded workers."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        require(False, "dask-jobqueue is not installed (the `slurm` extra)")
    from distributed import Client

    pythonpath = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    with SLURMCluster(
        cores=1,
        processes=1,
        memory="1GB",
        walltime="00:10:00",
        python=sys.executable,  # the workers run this venv's Python
        interface="lo",  # scheduler and workers on loopback
        job_script_prologue=[f"export PYTHONPATH={pythonpath}"],
        log_directory=str(slurm.root / "jobs"),
        local_directory=str(slurm.root / "dask"),
        scheduler_options={"dashboard_address": "127.0.0.1:0"},
        worker_extra_args=["--death-timeout", "60"],
    ) as cluster, Client(cluster) as client:
        cluster.scale(WORKERS)
        client.wait_for_workers(WORKERS, timeout=120)
        yield client


def assert_workers_are_slurm_jobs(slurm: Slurm, client: object) -> int:
    """Every Dask worker runs inside a RUNNING job of this SLURM; returns the tasks they ran."""
    import distributed

    def job(dask_worker: distributed.Worker) -> tuple[str | None, int]:
        return os.environ.get("SLURM_JOB_ID"), dask_worker.state.executed_count

    on_workers = client.run(job)
    assert len(on_workers) == WORKERS
    running = {j["id"]: j for j in slurm.jobs() if j["state"] == "RUNNING"}
    for address, (job_id, _) in on_workers.items():
        assert job_id in running, f"worker {address} is not in a running SLURM job: {running}"
        assert running[job_id]["name"] == "dask-worker" and running[job_id]["nodes"] == NODE
    return sum(executed for _, executed in on_workers.values())


def test_api_calibration_completes_on_slurm_workers(
    slurm: Slurm, slurm_client: object, tmp_path: Path
) -> None:
    import simcal

    before = assert_workers_are_slurm_jobs(slurm, slurm_client)
    max_trials, replicates = 24, 2
    cal = simcal.Calibration(
        model="simcal.models.synthetic:simulate",
        parameters={"x": (0.0, 1.0), "y": (0.0, 1.0)},
        targets=[simcal.Target("y", "simcal.models.synthetic:observed")],
        replicates=replicates, max_trials=max_trials, seed=7, study="slurm-api",
        storage=f"sqlite:///{tmp_path / 'api.db'}",
    )
    with cal.run(client=slurm_client, progress=False) as result:
        assert result.stats.completed == max_trials
        assert len(result.trials) == max_trials
        for name, value in result.best_params.items():
            assert abs(value - TRUTH) < 0.15, f"best {name} = {value}, truth {TRUTH}"
    assert slurm_client.status == "running"  # a client of ours is not closed
    assert_no_loss(stored_trials(f"sqlite:///{tmp_path / 'api.db'}", "slurm-api"), max_trials)
    ran = assert_workers_are_slurm_jobs(slurm, slurm_client) - before
    assert ran >= max_trials * replicates, f"SLURM workers ran {ran} tasks"


def test_cli_calibration_completes_on_slurm_workers(
    slurm: Slurm, slurm_client: object, tmp_path: Path
) -> None:
    before = assert_workers_are_slurm_jobs(slurm, slurm_client)
    max_trials, replicates = 24, 2
    config = write_config(tmp_path, study="slurm", max_trials=max_trials, replicates=replicates)
    summary_file = tmp_path / "summary.json"
    scheduler = slurm_client.scheduler.address
    done = run_simcal(
        "run", "--config", str(config), "--scheduler", scheduler, "--min-workers", str(WORKERS),
        "--metrics-port", "0", "--summary", str(summary_file), timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(summary_file.read_text())
    assert summary["n_completed"] == max_trials
    for name, value in summary["best_params"].items():
        assert abs(value - TRUTH) < 0.15, f"best {name} = {value}, truth {TRUTH}"
    assert_no_loss(stored_trials(f"sqlite:///{tmp_path / 'simcal.db'}", "slurm"), max_trials)
    ran = assert_workers_are_slurm_jobs(slurm, slurm_client) - before
    assert ran >= max_trials * replicates, f"SLURM workers ran {ran} tasks"
