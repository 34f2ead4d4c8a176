"""Manifest smoke test: the chart's own commands, run as local processes, finish a calibration.

The scheduler, 8 workers and the driver take their args and env from the rendered chart: the
DaskCluster's pods as the Dask operator's own builders make them (with the env the operator
adds), and the driver Job's pod. They run as Kubernetes would run them, except for what a pod
has and this host has not:

- the scheduler Service's DNS name is 127.0.0.1, and each declared container port is a free
  port on 127.0.0.1 (here 8 workers share one network namespace), so dask binds
  ``--host 127.0.0.1`` and simcal ``--metrics-host 127.0.0.1``;
- each volume mount is a temp dir, the ConfigMap's files written into its own;
- ``$(VAR)`` references in args are expanded from the container's env, as the kubelet does.

Each container's readiness and liveness probes are then asked over HTTP, as the kubelet would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from dask_kubernetes.operator.controller import (
    build_scheduler_deployment_spec,
    build_worker_deployment_spec,
)

from calibration_run import assert_calibrated, driver_summary
from chart import expand_k8s_vars, find, local_mounts, mount_rewriter, render
from conftest import run_simcal
from processes import (
    STUDY_OPEN,
    assert_no_loss,
    finished,
    free_port,
    start,
    start_scheduler,
    start_workers,
    stopping,
    stored_trials,
    wait_until,
)

RELEASE, NAMESPACE, STUDY, TRIALS = "smoke", "ci", "smoke-test", 12
VALUES = {
    "calibration": {
        "study": STUDY,
        "model": "simcal.models.synthetic:simulate",
        # null removes the default (SEIR) parameters, as with `helm --set`
        "parameters": {
            "beta": None, "gamma": None,
            "x": {"low": 0.0, "high": 1.0}, "y": {"low": 0.0, "high": 1.0},
        },
        "replicates": 3,
        "seed": 7,
        "targets": [{"name": "y", "observed": "simcal.models.synthetic:observed", "loss": "mse"}],
        "max_trials": TRIALS,
    },
    # long enough for the readiness probe to see /metrics after a quick run
    "driver": {"metricsLinger": 3},
}
IN_CLUSTER_SCHEDULER = re.compile(r"tcp://[a-z0-9.-]+\.svc\.cluster\.local:8786")
PORT_OPTIONS = ("--port", "--dashboard-address", "--metrics-port")
BIN = str(Path(sys.executable).parent)


@dataclass
class LocalContainer:
    """A rendered container made runnable here: argv, env, and its ports on 127.0.0.1."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ports: dict[str, int]
    probes: list[dict[str, Any]]

    def probes_pass(self) -> bool:
        """Whether every HTTP probe answers 200, as the kubelet would ask it."""
        for probe in self.probes:
            url = f"http://127.0.0.1:{self.ports[probe['port']]}{probe['path']}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status != 200:
                        return False
            except (urllib.error.URLError, OSError):
                return False
        return True


def localize(
    name: str,
    pod: dict[str, Any],
    root: Path,
    scheduler_port: int,
    config_maps: dict[str, dict[str, str]],
) -> LocalContainer:
    """The pod's one container, with its mounts, ports and scheduler address on this host."""
    (container,) = pod["containers"]
    mounts = local_mounts(name, pod, root, config_maps)
    ports = {
        p["name"]: scheduler_port if p["name"] == "tcp-comm" else free_port()
        for p in container.get("ports", [])
    }
    by_number = {p["containerPort"]: ports[p["name"]] for p in container.get("ports", [])}
    local_paths = mount_rewriter(mounts)

    def local_text(text: str) -> str:
        return local_paths(IN_CLUSTER_SCHEDULER.sub(f"tcp://127.0.0.1:{scheduler_port}", text))

    env = {}
    for item in container.get("env", []):
        if item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = name  # the downward API's pod name
            continue
        assert "value" in item, f"only literal env values and the pod name here: {item}"
        env[item["name"]] = local_text(item["value"])
    args = [local_text(expand_k8s_vars(a, env)) for a in container["args"]]
    for i, option in enumerate(args[:-1]):
        port = args[i + 1].rpartition(":")[2]
        if option in PORT_OPTIONS and port.isdigit() and int(port) in by_number:
            local = by_number[int(port)]
            args[i + 1] = f"127.0.0.1:{local}" if option.endswith("-address") else str(local)
    args += ["--host", "127.0.0.1"] if args[0] == "dask" else ["--metrics-host", "127.0.0.1"]
    probes = [
        container[kind]["httpGet"]
        for kind in ("readinessProbe", "livenessProbe")
        if "httpGet" in container.get(kind, {})
    ]
    full_env = {**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return LocalContainer(name, args, full_env, ports, probes)


def run_driver(driver: LocalContainer, log_path: Path) -> subprocess.CompletedProcess:
    """Run the driver to its end, asking its readiness probe on the way (metricsLinger keeps
    /metrics up a moment after the run); stdout is the summary, stderr the log."""
    with log_path.open("w+", encoding="utf-8") as log, subprocess.Popen(
        driver.argv, stdout=subprocess.PIPE, stderr=log, text=True, env=driver.env
    ) as popen:

        def ready() -> bool:
            assert popen.poll() is None, f"driver exited before ready:\n{log_path.read_text()}"
            return driver.probes_pass()

        try:
            wait_until(ready, 300, "the driver's readiness probe")
            stdout, _ = popen.communicate(timeout=600)
        finally:
            if popen.poll() is None:
                popen.kill()
        log.seek(0)
        return subprocess.CompletedProcess(driver.argv, popen.returncode, stdout, log.read())


@pytest.fixture(scope="module")
def chart() -> list[dict[str, Any]]:
    return render(VALUES, name=RELEASE, namespace=NAMESPACE)



def cluster_pods(
    cluster: dict[str, Any], replicas: int, local: Any
) -> tuple[LocalContainer, list[LocalContainer]]:
    """The DaskCluster's scheduler and ``replicas`` worker pods as the operator's own builders
    make them, each turned into a local process by ``local(name, pod)``."""
    name, spec = cluster["metadata"]["name"], cluster["spec"]
    scheduler = local("scheduler", build_scheduler_deployment_spec(
        name, spec["scheduler"]["spec"], {}, {}
    )["spec"]["template"]["spec"])
    workers = [
        local(f"worker-{i}", build_worker_deployment_spec(
            f"{name}-default", NAMESPACE, name, f"{i:010d}", spec["worker"]["spec"], {}, {},
        )["spec"]["template"]["spec"])
        for i in range(replicas)
    ]
    return scheduler, workers

def test_chart_commands_run_a_calibration(chart, tmp_path):
    cluster = find(chart, "DaskCluster")
    cluster_name, spec = cluster["metadata"]["name"], cluster["spec"]
    replicas = spec["worker"]["replicas"]
    assert replicas == 8
    config_maps = {c["metadata"]["name"]: c["data"] for c in chart if c["kind"] == "ConfigMap"}
    port = free_port()

    def local(name: str, pod: dict[str, Any]) -> LocalContainer:
        return localize(name, pod, tmp_path / "mounts", port, config_maps)

    scheduler, workers = cluster_pods(cluster, replicas, local)
    driver = local("driver", find(chart, "Job")["spec"]["template"]["spec"])
    assert driver.argv[driver.argv.index("--scheduler") + 1] == f"tcp://127.0.0.1:{port}"
    worker_name = workers[0].argv[workers[0].argv.index("--name") + 1]
    assert worker_name == f"{cluster_name}-default-worker-0000000000"
    logs = tmp_path / "logs"
    logs.mkdir()

    with stopping() as procs:
        procs.append(start("scheduler", scheduler.argv, logs, env=scheduler.env))
        wait_until(lambda: procs[0].says("Scheduler at") and scheduler.probes_pass(), 120,
                   "the scheduler's probes")
        procs.extend(start(w.name, w.argv, logs, env=w.env) for w in workers)
        wait_until(lambda: all(p.says("Registered to") for p in procs[1:]), 300, "the workers")
        wait_until(lambda: all(w.probes_pass() for w in workers), 60, "the workers' probes")
        result = run_driver(driver, logs / "driver.log")
        summary = driver_summary(result, *procs[:2])
        for proc in procs:  # all at once; stopping() then waits for each
            proc.signal(signal.SIGTERM, group=True)
    storage = driver.argv[driver.argv.index("--storage") + 1]
    assert_calibrated(summary, storage, STUDY, TRIALS, replicas)


# --- a user's own model, submitted with `simcal submit` against the release -------------------

USER_MODEL = """import numpy as np


def simulate(params, seed):
    rng = np.random.default_rng(seed)
    return {"incidence": params["beta"] * np.arange(10.0) + rng.normal(0, 0.1, 10)}
"""
USER_RELEASE = {"workers": {"replicas": 2}, "driver": {"metricsLinger": 3}}


def test_submitted_job_runs_a_users_own_model_and_results_come_out(tmp_path):
    """The new-user path: ``mysir.py`` and ``incidence.csv`` beside the config, submitted with
    ``simcal submit`` against a release whose image (here: this venv) lacks ``mysir``. The
    Job's pod (the release's driver template, the ConfigMap's files at their paths) runs here
    against the release's scheduler and 2 workers; the driver ships ``mysir`` to them. Then
    ``simcal submit --results`` makes the Job that prints the study's results from the
    release's storage (the same PVC directory)."""
    project = tmp_path / "proj"
    (project / "data").mkdir(parents=True)
    (project / "mysir.py").write_text(USER_MODEL, encoding="utf-8")
    rows = "\n".join(str(0.5 * i) for i in range(10))
    (project / "data" / "incidence.csv").write_text(f"incidence\n{rows}\n", encoding="utf-8")
    config = {
        "study": "mysir", "model": "mysir:simulate", "replicates": 2, "max_trials": 8,
        "parameters": {"beta": {"low": 0.1, "high": 1.0}}, "sampler": "random",
        "targets": [{"name": "incidence", "observed": "data/incidence.csv"}],
        "storage": "sqlite:///simcal.db",  # as in the examples: replaced by the release's
    }
    (project / "calibration.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(USER_RELEASE), encoding="utf-8")
    release = ["--release", RELEASE, "--namespace", NAMESPACE, "--values", str(values)]
    submitted = run_simcal(
        "submit", "--dry-run", *release, "--config", str(project / "calibration.yaml"),
        cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stderr
    assert "storage: in the config is replaced" in submitted.stderr
    config_map, job = yaml.safe_load_all(submitted.stdout)
    results = run_simcal("submit", "--dry-run", *release, "--results", "mysir", cwd=tmp_path)
    assert results.returncode == 0, results.stderr
    (results_job,) = yaml.safe_load_all(results.stdout)

    chart = render({**USER_RELEASE, "driver": {**USER_RELEASE["driver"], "enabled": False}},
                   name=RELEASE, namespace=NAMESPACE)
    cluster = find(chart, "DaskCluster")
    config_maps = {c["metadata"]["name"]: c["data"] for c in [*chart, config_map]
                   if c["kind"] == "ConfigMap"}
    port = free_port()
    root = tmp_path / "mounts"

    def local(name: str, pod: dict[str, Any]) -> LocalContainer:
        return localize(name, pod, root, port, config_maps)

    scheduler, workers = cluster_pods(cluster, 2, local)
    pod = job["spec"]["template"]["spec"]
    driver = local("driver", pod)
    assert driver.argv[driver.argv.index("--min-workers") + 1] == "2"  # the release's count
    logs = tmp_path / "logs"
    logs.mkdir()
    with stopping() as procs:
        procs.append(start("scheduler", scheduler.argv, logs, env=scheduler.env))
        wait_until(lambda: procs[0].says("Scheduler at"), 120, "the scheduler")
        procs.extend(start(w.name, w.argv, logs, env=w.env) for w in workers)
        wait_until(lambda: all(p.says("Registered to") for p in procs[1:]), 300, "the workers")
        result = run_driver(driver, logs / "driver.log")
        for proc in procs:
            proc.signal(signal.SIGTERM, group=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shipped module mysir" in result.stderr
    storage = driver.argv[driver.argv.index("--storage") + 1]
    trials = stored_trials(storage, "mysir")
    assert len(trials) == 8 and all(t.user_attrs.get("fail_reason") is None for t in trials)

    # the results Job's pod on the same PVC directory (the volume of the same name)
    results_pod = results_job["spec"]["template"]["spec"]
    (container,) = results_pod["containers"]
    mounts = local_mounts("driver", results_pod, root, config_maps)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # not POD_NAME
    argv = [mount_rewriter(mounts)(a) for a in container["args"]]
    printed = subprocess.run(
        argv, capture_output=True, text=True, timeout=120,
        env={**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.strip().splitlines()
    assert lines[0].startswith("best,number,") and len(lines) == 1 + 8, printed.stdout


def test_helm_upgrade_mid_run_loses_and_duplicates_nothing(tmp_path):
    """Two revisions' driver Jobs overlap, as during `helm upgrade`: revision 2's driver starts
    while revision 1's runs on the same storage (the PVC), then revision 1's pod gets SIGTERM
    (Helm deletes the old Job). Every trial is counted once and the budget is exact."""
    trials = 80
    values = {
        **VALUES,
        "calibration": {
            **VALUES["calibration"], "max_trials": trials, "sampler": "random",
            "model_options": {"duration": 0.3}, "replicates": 2, "grace_period": 2,
            "lease_interval": 1, "lease_grace": 4,
        },
        "workers": {"replicas": 3, "minReplicas": 3},
    }
    scheduler_proc, address = start_scheduler(tmp_path)
    port = int(address.rpartition(":")[2])
    drivers = []
    for revision in (1, 2):
        objects = render(values, name=RELEASE, namespace=NAMESPACE, revision=revision)
        config_maps = {
            c["metadata"]["name"]: c["data"] for c in objects if c["kind"] == "ConfigMap"
        }
        job = find(objects, "Job")
        assert job["metadata"]["name"].endswith(f"-driver-{revision}")
        name = job["metadata"]["name"]
        drivers.append(localize(name, job["spec"]["template"]["spec"], tmp_path, port, config_maps))
    # one PVC: revision 2's /data is revision 1's
    data = [Path(d.argv[d.argv.index("--storage") + 1].removeprefix("sqlite:///")).parent
            for d in drivers]
    data[1].rmdir()
    data[1].symlink_to(data[0], target_is_directory=True)
    storage = drivers[0].argv[drivers[0].argv.index("--storage") + 1]
    logs = tmp_path / "logs"
    logs.mkdir()
    with stopping(scheduler_proc) as procs:
        procs.append(start_workers(address, logs, nworkers=3))
        old = start("driver-rev1", drivers[0].argv, logs, env=drivers[0].env)
        procs.append(old)
        wait_until(lambda: len(finished(stored_trials(storage, STUDY))) >= 5
                   if old.says(STUDY_OPEN) else False, 300, "revision 1 telling trials")
        new = start("driver-rev2", drivers[1].argv, logs, env=drivers[1].env)
        procs.append(new)

        def both_told_trials() -> bool:
            told = finished(stored_trials(storage, STUDY)) if new.says(STUDY_OPEN) else []
            return any(t.user_attrs.get("host") == drivers[1].name for t in told)

        wait_until(both_told_trials, 300, "revision 2 telling trials beside revision 1")
        assert old.alive(), "revision 1 finished before the overlap: raise the budget"
        old.signal(signal.SIGTERM)  # Helm deletes the old Job: its pod is terminated
        assert old.wait(120) == 0, old.output()[-4000:]
        assert new.wait(300) == 0, new.output()[-4000:]
    all_trials = stored_trials(storage, STUDY)
    assert_no_loss(all_trials, trials)  # exactly `trials` counted: one driver was stopping
    hosts = {t.user_attrs.get("host") for t in finished(all_trials)}
    assert hosts == {drivers[0].name, drivers[1].name}, hosts  # both ran trials (POD_NAME)
    assert "Traceback" not in old.output() + new.output()
