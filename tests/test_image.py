"""The container image: hadolint on the Dockerfile, then the real image built with podman.

The image is built from a local Debian base (``debootstrap --variant=minbase`` with python3 and
python3-venv, ``podman import``), runs ``simcal --version``, and runs a short calibration as a
scheduler, 8 worker and a driver container on the host network, hardened like the chart's pods
(read-only root filesystem, all capabilities dropped, uid 1000).

Without podman, runc, debootstrap or root the podman tests skip, unless ``CI`` is set: then they
fail. The build (base, cache under ``$SIMCAL_IMAGE_CACHE``, podman flags) is
scripts/cluster/images.py, shared with ``make cluster``: after a source edit only the simcal wheel
is rebuilt. Delete the cache directory to build from scratch.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

import simcal
from calibration_run import assert_calibrated, driver_summary
from conftest import REPO, require, write_config
from processes import free_port, start, stopping, wait_until

sys.path.insert(0, str(REPO / "scripts" / "cluster"))
# scripts/cluster/images.py: the image build, shared with make cluster.
import images
from images import Podman

HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"
WORKERS, TRIALS = 8, 12
# The first podman test also pays for debootstrap and the build (about 4 min from scratch here).
PODMAN_TIMEOUT = pytest.mark.timeout(2400)


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HADOLINT, "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True, text=True, timeout=60,
    )


def test_hadolint_passes():
    result = hadolint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_passes_the_own_model_example():
    result = hadolint(REPO / "examples" / "own-model" / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_requires_the_oci_labels(tmp_path):
    """The label schema in .hadolint.yaml is live: a Dockerfile without the title label fails."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    without_title = re.sub(r'org\.opencontainers\.image\.title="[^"]*" ', "", text)
    assert without_title != text
    (tmp_path / "Dockerfile").write_text(without_title, encoding="utf-8")
    result = hadolint(tmp_path / "Dockerfile")
    assert result.returncode != 0
    assert "DL3049" in result.stdout and "org.opencontainers.image.title" in result.stdout




@pytest.fixture(scope="session")
def podman() -> Podman:
    """podman on overlay storage, or on vfs where overlay does not work."""
    missing = images.missing_tools()
    require(not missing, f"the image build needs {', '.join(missing)}")
    return images.podman()


@pytest.fixture(scope="session")
def base_image(podman: Podman) -> str:
    """localhost/simcal-base:<key>, imported from the (cached) debootstrap tarball."""
    return images.base_image(podman)


@pytest.fixture(scope="session")
def image(podman: Podman, base_image: str) -> str:
    """The simcal image built from this checkout (layer-cached), as an image ID."""
    return images.simcal_image(podman, base_image, tag="localhost/simcal:test")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _constraints() -> dict[str, str]:
    pins = (line.split("==") for line in (REPO / "constraints.txt").read_text().split())
    return {_canonical(name): version for name, version in pins}


INSTALLED = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
)


@PODMAN_TIMEOUT
def test_image_runs_as_uid_1000_with_the_tested_versions(podman, image):
    config = json.loads(podman("image", "inspect", image))[0]["Config"]
    assert config["User"] == "1000:1000"
    assert not config.get("Entrypoint"), "the chart passes the whole command in args"
    assert config["Labels"]["org.opencontainers.image.version"] == simcal.__version__

    def run(*args: str) -> str:
        return podman(*podman.run_args(image, *args))

    assert run("simcal", "--version").strip() == f"simcal {simcal.__version__}"
    assert run("dask", "--version").strip().endswith(_constraints()["dask"])
    assert run("id", "-u").strip() == "1000"
    installed = {_canonical(k): v for k, v in json.loads(run("python", "-c", INSTALLED)).items()}
    pins = _constraints()
    assert {"dask", "distributed", "optuna", "numpy", "psycopg2-binary"} <= set(installed)
    drift = {k: (v, pins[k]) for k, v in installed.items() if k in pins and pins[k] != v}
    assert not drift, f"image versions differ from constraints.txt: {drift}"


@PODMAN_TIMEOUT
def test_calibration_in_containers(podman, image, tmp_path):
    """Scheduler, 8 workers and the driver as containers, hardened like the chart's pods."""
    config, data, logs = tmp_path / "config", tmp_path / "data", tmp_path / "logs"
    for directory in (config, data, logs):
        directory.mkdir()
    write_config(config, max_trials=TRIALS, storage="sqlite:////data/simcal.db")
    port, dashboard = free_port(), free_port()
    scheduler = f"tcp://127.0.0.1:{port}"
    prefix = f"simcal-test-{uuid.uuid4().hex[:8]}"
    names: list[str] = []

    def container(name: str, *args: str, options: tuple[str, ...] = ()) -> list[str]:
        names.append(f"{prefix}-{name}")
        options = (f"--name={names[-1]}", *options)
        return podman.argv(*podman.run_args(image, *args, options=options))

    try:
        with stopping() as procs:
            procs.append(start("scheduler", container(
                "scheduler", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                "--dashboard-address", f"127.0.0.1:{dashboard}",
            ), logs))
            wait_until(lambda: procs[0].says("Scheduler at"), 300, "the scheduler container")
            procs.extend(start(f"worker-{i}", container(
                f"worker-{i}", "dask", "worker", scheduler, "--name", f"worker-{i}",
                "--nthreads", "1", "--memory-limit", "1GiB", "--host", "127.0.0.1",
                "--no-dashboard", "--local-directory", "/scratch", options=("--tmpfs=/scratch:U",),
            ), logs) for i in range(WORKERS))
            result = subprocess.run(container(
                "driver", "simcal", "run", "--config", "/etc/simcal/calibration.yaml",
                "--scheduler", scheduler, "--min-workers", str(WORKERS), "--metrics-port", "0",
                "--connect-timeout", "300", "--storage", "sqlite:////data/simcal.db",
                options=(f"--volume={config}:/etc/simcal:ro", f"--volume={data}:/data:U"),
            ), capture_output=True, text=True, timeout=900)
            summary = driver_summary(result, *procs[:2])
            # The chart's scheduler probes and ServiceMonitor use these endpoints.
            http = f"http://127.0.0.1:{dashboard}"
            with urllib.request.urlopen(f"{http}/health", timeout=10) as response:
                assert response.read() == b"ok"
            with urllib.request.urlopen(f"{http}/metrics", timeout=10) as response:
                assert b"dask_scheduler_workers" in response.read()
            for proc in procs:  # all at once; stopping() then waits for each
                proc.signal(signal.SIGTERM, group=True)
    finally:
        podman("rm", "--force", "--ignore", "--time=0", *names, check=False)
    assert_calibrated(summary, f"sqlite:///{data}/simcal.db", "synthetic-test", TRIALS, WORKERS)


@PODMAN_TIMEOUT
def test_own_model_image_from_simcals_installs_the_users_package(podman, image):
    """examples/own-model/Dockerfile: FROM simcal's image, pip install of the team's package;
    the result imports mysir from site-packages as uid 1000 and runs it, and simcal is there."""
    own = podman.build(REPO / "examples" / "own-model", "localhost/simcal-mysir:test",
                       f"SIMCAL_IMAGE={image}", timeout=1200)
    probe = (
        "import mysir, simcal; "
        "out = mysir.simulate({'beta': 0.3, 'gamma': 0.1}, 1)['incidence']; "
        "print(mysir.__file__, len(out), simcal.__version__)"
    )
    printed = podman(*podman.run_args(own, "python", "-c", probe)).split()
    assert "site-packages/mysir/__init__.py" in printed[0]
    assert printed[1:] == ["60", simcal.__version__]
    assert podman(*podman.run_args(own, "id", "-u")).strip() == "1000"
