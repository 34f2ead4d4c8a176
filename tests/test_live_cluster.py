"""simcal on a real Kubernetes: `make cluster`, the Dask operator, `helm install` of the chart.

The module's fixture starts the throwaway one-node cluster (scripts/cluster/cluster.sh: real
kube-apiserver, controller-manager, scheduler, kubelet on containerd + runc, kube-proxy, CoreDNS,
all inside the network namespace simcal-k8s), installs the Dask operator from the chart that the
pinned dask-kubernetes wheel ships (its controller image built locally from PyPI), and afterwards
uninstalls it, runs `make cluster-down` and checks that no process, mount, network namespace or
changed sysctl is left on the host.

Needs root, Go, etcd, containerd, runc, podman and debootstrap (make system-deps); without them
the tests skip, unless ``CI`` is set: then they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dask_kubernetes
import pytest
import yaml

from conftest import REPO, require
from live_postgres import node_postgres
from live_prometheus import LivePrometheus
from pgserver import postgres_bin

CLUSTER = REPO / ".cluster"
KUBECTL = CLUSTER / "bin" / "kubectl"
HELM = CLUSTER / "bin" / "helm"
IN_NETNS = CLUSTER / "bin" / "in-cluster-netns"
CACHE = Path(os.environ.get("SIMCAL_CLUSTER_CACHE", "/var/cache/simcal-cluster"))
OPERATOR_CHART = (
    Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm"
    / "dask-kubernetes-operator"
)
OUR_PATHS = ("/var/lib/simcal-cluster", "/run/simcal-cluster", str(CACHE / "bin"))
KUBELET_SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops")
WORKERS = 8
# Long enough (a few minutes at this machine's pace) that a fault lands mid-run.
FAULT_TRIALS = 600
# Generous: the machine is shared and loaded; these are deadlines, not measurements.
pytestmark = pytest.mark.timeout(5400)


def sh(
    *argv: object, timeout: float = 600, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env=None if env is None else {**os.environ, **env},
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def kubectl(*args: object, timeout: float = 300, check: bool = True) -> str:
    return sh(KUBECTL, *args, timeout=timeout, check=check).stdout


def helm(*args: object, timeout: float = 900, check: bool = True) -> str:
    return sh(HELM, *args, timeout=timeout, check=check).stdout


def host_state() -> dict[str, object]:
    """What the cluster may change on the host: our processes, mounts, namespaces, sysctls."""
    processes = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(path in cmdline for path in OUR_PATHS) and "pytest" not in cmdline:
            processes.append(cmdline)
    mounts = [
        line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith((*OUR_PATHS[:2], "/var/lib/kubelet", "/run/netns/cni-"))
    ]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {
        "processes": sorted(processes),
        "mounts": sorted(mounts),
        "netns": sorted(line.split()[0] for line in netns.splitlines()
                        if line.startswith(("simcal-k8s", "cni-"))),
        "sysctls": {key: subprocess.run(["sysctl", "-n", key], capture_output=True,
                                        text=True).stdout.strip() for key in KUBELET_SYSCTLS},
        "dirs": sorted(d for d in ("/var/lib/kubelet", "/var/log/pods", "/var/lib/simcal-cluster",
                                   "/run/simcal-cluster", str(CLUSTER)) if Path(d).exists()),
    }


def wait_for(condition, timeout: float, what: str, interval: float = 3.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n"
                        + kubectl("get", "pods", "-A", "-o", "wide", check=False))
        time.sleep(interval)


def pods(selector: str, namespace: str = "default") -> list[dict]:
    listing = kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
    return json.loads(listing)["items"]


def running(selector: str, namespace: str = "default") -> list[dict]:
    return [p for p in pods(selector, namespace) if p["status"].get("phase") == "Running"
            and all(c.get("ready") for c in p["status"].get("containerStatuses", []))]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    require(os.geteuid() == 0, "the local cluster needs root (network namespace, kubelet)")
    for tool in ("go", "etcd", "containerd", "runc", "podman", "debootstrap", "ip", "iptables"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (make system-deps)")
    before = host_state()
    try:
        up = sh("make", "cluster", timeout=3600)
        print(up.stdout[-2000:])
        helm("install", "dask-operator", OPERATOR_CHART, "--namespace", "dask-operator",
             "--create-namespace", "-f", CLUSTER / "operator-values.yaml",
             "--wait", "--timeout", "10m")
        yield
    finally:
        if HELM.exists():
            sh(HELM, "uninstall", "dask-operator", "--namespace", "dask-operator", "--wait",
               timeout=300, check=False)
        down = sh("make", "cluster-down", timeout=600, check=False)
        assert down.returncode == 0, down.stdout + down.stderr
        assert host_state() == before


def job_named(release: str) -> str:
    jobs = json.loads(kubectl("get", "jobs", "-l", f"app.kubernetes.io/instance={release}",
                              "-o", "json"))["items"]
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    return jobs[0]["metadata"]["name"]


def job_done(name: str) -> str | None:
    status = json.loads(kubectl("get", "job", name, "-o", "json"))["status"]
    for condition in status.get("conditions", []):
        if condition["status"] == "True" and condition["type"] in ("Complete", "Failed"):
            return condition["type"]
    return None


def summary_of(job: str) -> dict:
    """The run's JSON summary (indented JSON on stdout): the last ``{`` ... ``}`` block of the
    driver's log."""
    done = [p["metadata"]["name"] for p in pods(f"job-name={job}")
            if p["status"].get("phase") == "Succeeded"]
    source = f"pod/{done[-1]}" if done else f"job/{job}"  # after a retry: the pod that finished
    lines = kubectl("logs", source, "--tail", "400").splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    ends = [i for i, line in enumerate(lines) if line == "}"]
    if not starts or not ends or ends[-1] < starts[-1]:
        pytest.fail("no JSON summary in the driver's log:\n" + "\n".join(lines[-40:]))
    return json.loads("\n".join(lines[starts[-1]:ends[-1] + 1]))


def test_helm_install_runs_the_seir_demo(cluster):
    """The chart as a user installs it: scheduler + 8 worker pods Running, the driver Job runs
    the SEIR demo to completion, `helm test` passes, the Job's log ends with the summary."""
    trials = 150  # the chart's SEIR demo as it ships
    helm("install", "demo", "./helm/simcal", "-f", CLUSTER / "values.yaml", "--timeout", "15m")
    wait_for(lambda: len(running("dask.org/component=worker")) >= WORKERS, 1200,
             f"{WORKERS} Running worker pods")
    assert len(running("dask.org/component=scheduler")) == 1
    job = job_named("demo")
    assert wait_for(lambda: job_done(job), 1800, "the driver Job to finish") == "Complete", \
        kubectl("logs", f"job/{job}", "--tail", "80", check=False)
    summary = summary_of(job)
    assert summary["study"] == "seir-demo"
    assert summary["n_completed"] == trials and summary["n_failed"] == 0, summary
    assert summary["workers"] == WORKERS, summary
    tested = helm("test", "demo", "--timeout", "10m")
    assert re.search(r"TEST SUITE:\s+demo-simcal-test-cluster", tested), tested
    assert re.search(r"Phase:\s+Succeeded", tested), tested


def submitted(*args: object, env: dict | None = None) -> str:
    """`simcal submit ...` from this checkout against the live API server (run inside the
    cluster's network namespace with its kubeconfig): the name of the Job it created."""
    out = sh(IN_NETNS, sys.executable, "-m", "simcal.cli", "submit", *args, env=env).stdout
    found = re.search(r"^job\.batch/(\S+) created", out, re.M)
    assert found, out
    return found.group(1)


def test_simcal_submit_runs_the_own_model_and_retrieves_its_trials(cluster, tmp_path):
    """examples/own-model as it ships (a copy with max_trials lowered), submitted to the demo
    release with its project folder on PYTHONPATH as the example's header says: the package
    mysir travels in the ConfigMap and imports in the pod; the Job completes; `simcal submit
    --results` prints its trials."""
    trials = 16
    own = tmp_path / "own-model"
    shutil.copytree(REPO / "examples" / "own-model", own)
    config = yaml.safe_load((own / "calibration.yaml").read_text(encoding="utf-8"))
    config["max_trials"] = trials
    (own / "calibration.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(own / "mysir")])}
    if not json.loads(kubectl("get", "jobs", "-o", "json"))["items"]:
        helm("install", "demo", "./helm/simcal", "-f", CLUSTER / "values.yaml",
             "--set", "driver.enabled=false", "--timeout", "15m")
    job = submitted("--release", "demo", "--config", own / "calibration.yaml", env=env)
    assert wait_for(lambda: job_done(job), 1800, f"job {job}") == "Complete", \
        kubectl("logs", f"job/{job}", "--tail", "80", check=False)
    summary = summary_of(job)
    assert summary["study"] == "mysir" and summary["n_completed"] == trials, summary
    results = submitted("--release", "demo", "--results", "mysir", "--format", "json", env=env)
    assert wait_for(lambda: job_done(results), 600, f"job {results}") == "Complete"
    rows = json.loads(kubectl("logs", f"job/{results}"))
    assert len(rows) == trials, rows
    # Submitted Jobs are not part of the release; their pods hold the release's claim.
    kubectl("delete", "job", job, results, "--cascade=foreground")


def progress(job: str) -> int:
    """Trials the driver reports done so far (its progress log lines), else 0."""
    log = kubectl("logs", f"job/{job}", "--tail", "50", check=False)
    done = re.findall(r"trials (\d+)/\d+", log)
    return int(done[-1]) if done else 0


def test_worker_pod_deleted_mid_run_is_replaced_and_the_run_completes(cluster):
    """A worker pod deleted while trials run: the operator starts a new one, the driver loses
    no trial (every asked trial is told, the count is exact)."""
    helm("uninstall", "demo", "--wait", "--timeout", "5m", check=False)
    trials = FAULT_TRIALS
    helm("install", "faults", "./helm/simcal", "-f", CLUSTER / "values.yaml",
         "--set", f"calibration.max_trials={trials}",
         "--set-json", 'storage.persistence.annotations={"helm.sh/resource-policy":"keep"}',
         "--timeout", "15m")
    wait_for(lambda: len(running("dask.org/component=worker")) >= WORKERS, 1200,
             f"{WORKERS} Running worker pods")
    job = job_named("faults")
    wait_for(lambda: progress(job) >= 8, 1200, "the first trials")
    victim = running("dask.org/component=worker")[0]["metadata"]["name"]
    kubectl("delete", "pod", victim, "--wait=false")
    wait_for(lambda: len(running("dask.org/component=worker")) >= WORKERS
             and victim not in {p["metadata"]["name"] for p in pods("dask.org/component=worker")},
             900, "the operator to replace the deleted worker")
    assert wait_for(lambda: job_done(job), 1800, "the driver Job to finish") == "Complete", \
        kubectl("logs", f"job/{job}", "--tail", "80", check=False)
    summary = summary_of(job)
    assert summary["n_completed"] == trials and summary["n_failed"] == 0, summary


def test_helm_uninstall_keeps_the_studys_volume(cluster):
    """With the documented keep annotation, `helm uninstall` leaves the study's claim; a new
    install of the same release finds the finished study and runs no trial again."""
    helm("uninstall", "faults", "--wait", "--timeout", "5m")
    claims = json.loads(kubectl("get", "pvc", "-o", "json"))["items"]
    assert "faults-simcal-data" in {c["metadata"]["name"] for c in claims}
    helm("install", "faults", "./helm/simcal", "-f", CLUSTER / "values.yaml",
         "--set", f"calibration.max_trials={FAULT_TRIALS}", "--timeout", "15m")
    job = job_named("faults")
    assert wait_for(lambda: job_done(job), 1800, "the driver Job to finish") == "Complete", \
        kubectl("logs", f"job/{job}", "--tail", "80", check=False)
    summary = summary_of(job)
    assert summary["n_completed"] == FAULT_TRIALS and summary["this_run"]["completed"] == 0, summary
    helm("uninstall", "faults", "--wait", "--timeout", "5m")


def test_scheduler_pod_deleted_mid_run_the_study_completes_exactly(cluster):
    """The Dask scheduler's pod deleted while trials run: the operator starts a new one; the
    driver either survives it or fails and the Job's retry resumes the study from storage.
    Either way the study ends with exactly max_trials completed trials, none failed."""
    helm("install", "sched", "./helm/simcal", "-f", CLUSTER / "values.yaml",
         "--set", f"calibration.max_trials={FAULT_TRIALS}", "--timeout", "15m")
    wait_for(lambda: len(running("dask.org/component=worker")) >= WORKERS, 1200,
             f"{WORKERS} Running worker pods")
    job = job_named("sched")
    wait_for(lambda: progress(job) >= 8, 1200, "the first trials")
    victim = running("dask.org/component=scheduler")[0]["metadata"]["name"]
    kubectl("delete", "pod", victim, "--wait=false")
    assert wait_for(lambda: job_done(job), 2400, "the driver Job to finish") == "Complete", \
        kubectl("logs", f"job/{job}", "--tail", "80", check=False)
    summary = summary_of(job)
    assert summary["n_completed"] == FAULT_TRIALS and summary["n_failed"] == 0, summary
    helm("uninstall", "sched", "--wait", "--timeout", "5m")


def test_helm_upgrade_mid_run_resumes_from_storage_and_the_count_is_exact(cluster):
    """`helm upgrade` while the driver Job runs, raising the budget (README: "upgrade (starts a
    new driver that resumes from storage)"): the chart names the driver Job by revision, so Helm
    deletes driver 1 (SIGTERM: it tells what finished and re-enqueues what was in flight) and
    starts driver 2, which resumes the study. Nothing told is lost: the study ends with exactly
    the new max_trials completed, from both drivers, every other trial an interrupted one whose
    retry completed, and no parameters run to completion twice."""
    first, raised = FAULT_TRIALS // 2, FAULT_TRIALS // 2 + 40
    values = ("-f", CLUSTER / "values.yaml", "--set", "calibration.study=upgrade-live")
    helm("install", "upg", "./helm/simcal", *values,
         "--set", f"calibration.max_trials={first}", "--timeout", "15m")
    old = job_named("upg")
    wait_for(lambda: progress(old) >= 8, 1200, "the first trials")
    assert job_done(old) is None, "driver 1 finished before the upgrade"
    helm("upgrade", "upg", "./helm/simcal", *values,
         "--set", f"calibration.max_trials={raised}", "--timeout", "15m")
    new = old.removesuffix("-1") + "-2"
    wait_for(lambda: [j["metadata"]["name"] for j in json.loads(kubectl(
        "get", "jobs", "-l", "app.kubernetes.io/instance=upg", "-o", "json"))["items"]] == [new],
        600, "Helm to replace driver 1's Job with driver 2's")
    assert wait_for(lambda: job_done(new), 1800, "driver 2's Job to finish") == "Complete", \
        kubectl("logs", f"job/{new}", "--tail", "80", check=False)
    summary = summary_of(new)
    assert summary["n_completed"] == raised and summary["n_failed"] == 0, summary
    assert 0 < summary["this_run"]["completed"] < raised, summary
    results = submitted("--release", "upg", "--results", "upgrade-live", "--format", "json",
                        env={"PYTHONPATH": str(REPO / "src")})
    assert wait_for(lambda: job_done(results), 600, f"job {results}") == "Complete"
    rows = json.loads(kubectl("logs", f"job/{results}"))
    completed = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(completed) == raised
    assert len({r["run_id"] for r in completed}) == 2, "both drivers completed trials"
    others = [r for r in rows if r["state"] != "COMPLETE"]
    assert all(r["state"] == "FAIL" and r["fail_reason"] == "interrupted" for r in others), others
    retried = {r["retry_of"] for r in completed if r["retry_of"] is not None}
    assert {r["number"] for r in others} <= retried, "an interrupted trial was not run again"
    params = [tuple(v for k, v in sorted(r.items()) if k.startswith("param_")) for r in completed]
    assert len(set(params)) == raised, "a trial's parameters ran to completion twice"
    kubectl("delete", "job", results, "--cascade=foreground")
    helm("uninstall", "upg", "--wait", "--timeout", "5m")


def test_prometheus_scrapes_the_live_pods_and_records_throughput(cluster, tmp_path):
    """Debian's Prometheus in the cluster's namespace finds the driver, scheduler and worker
    pods through the API server by the chart's labels and annotations, loads the chart's rules,
    and the throughput recording rule has data while the run goes on."""
    require(shutil.which("prometheus") is not None, "prometheus is not installed")
    rules = REPO / "helm" / "simcal" / "files" / "prometheus-rules.yaml"
    prometheus = LivePrometheus(tmp_path, rules)
    try:
        helm("install", "prom", "./helm/simcal", "-f", CLUSTER / "values.yaml",
             "--set", f"calibration.max_trials={FAULT_TRIALS}",
             "--set", "calibration.study=prom-live", "--timeout", "15m")

        def throughput() -> list[dict]:
            ours = "app.kubernetes.io/instance=prom"
            prometheus.update(
                json.loads(kubectl("get", "pods", "-l", ours, "-o", "json"))["items"],
                json.loads(kubectl("get", "services", "-l", ours, "-o", "json"))["items"],
            )
            return prometheus.query('simcal:trials_per_minute:rate5m{study="prom-live"} > 0')

        wait_for(throughput, 1200, "the throughput recording rule to have data")
        up = {t["labels"]["job"] for t in prometheus.api("targets")["activeTargets"]
              if t["health"] == "up"}
        assert {"simcal-driver", "simcal-scheduler", "simcal-workers"} <= up, up
        loaded = {r["name"] for g in prometheus.api("rules")["groups"] for r in g["rules"]}
        assert {"SimcalThroughputRegression", "simcal:trials_per_minute:rate5m"} <= loaded
        job = job_named("prom")
        assert wait_for(lambda: job_done(job), 1800, "the driver Job to finish") == "Complete"
    finally:
        prometheus.stop()
    helm("uninstall", "prom", "--wait", "--timeout", "5m")


def test_two_driver_pods_share_one_study_on_postgresql(cluster):
    """driver.parallelism: 2 with the study on a real PostgreSQL (Debian's, on the node IP):
    two driver pods run one study; it ends with exactly max_trials completed trials."""
    require(postgres_bin() is not None, "Debian's postgresql is not installed")
    trials = 200
    with node_postgres() as pg:
        kubectl("create", "secret", "generic", "para-storage", f"--from-literal=url={pg.url()}")
        helm("install", "para", "./helm/simcal", "-f", CLUSTER / "values.yaml",
             "--set", "driver.parallelism=2", "--set", "storage.existingSecret=para-storage",
             "--set", f"calibration.max_trials={trials}", "--timeout", "15m")
        job = job_named("para")
        assert wait_for(lambda: job_done(job), 1800, "the driver Job to finish") == "Complete", \
            kubectl("logs", f"job/{job}", "--tail", "80", check=False)
        drivers = [p for p in pods(f"job-name={job}") if p["status"].get("phase") == "Succeeded"]
        assert len(drivers) == 2, [p["metadata"]["name"] for p in drivers]
        completed = pg.scalar(
            "SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "WHERE s.study_name = 'seir-demo' AND t.state = 'COMPLETE'"
        )
        assert completed == trials
        helm("uninstall", "para", "--wait", "--timeout", "5m")
        kubectl("delete", "secret", "para-storage")


def test_a_live_throughput_regression_fires_simcal_throughput_regression(cluster, tmp_path):
    """The seed's story on the live cluster: a run's healthy throughput is measured, the run
    loses 6 of its 8 workers (the DaskWorkerGroup scaled to 2), and SimcalThroughputRegression,
    from the chart's rules with only its `for:` shortened to 1m through
    monitoring.prometheusRule.throughputRegressionFor, goes pending, then firing.

    Stand-in for 75 minutes of history: the rule's baseline (simcal:trials_per_minute:baseline3h)
    needs the study's 5m rate to have existed 75 minutes ago. The healthy phase's live
    simcal:trials_per_minute:rate5m, measured by this Prometheus from the driver's counters, is
    backfilled as that series' history (`promtool tsdb create-blocks-from openmetrics`, Prometheus
    stopped and started again on its data), 4 hours up to the moment the live scraping began.
    Everything after that is live: the counters, the recording rules, the alert.

    The model sleeps (the synthetic model's `duration`): the run's throughput is set by its
    worker count, not by this shared machine's CPU."""
    require(shutil.which("prometheus") is not None, "prometheus is not installed")
    from chart import find, render
    from monitoring import promtool

    study = "regression-live"
    rule = find(render({"monitoring": {"prometheusOperator": "always",
                                       "prometheusRule": {"throughputRegressionFor": "1m"}}}),
                "PrometheusRule")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}), encoding="utf-8")
    values = tmp_path / "regression.yaml"
    values.write_text(yaml.safe_dump({"calibration": {
        "study": study,
        "model": "simcal.models.synthetic:simulate",
        "model_options": {"duration": 3.0},  # 2 replicates: 6 worker-seconds a trial
        "parameters": {"beta": None, "gamma": None,  # null drops the chart's SEIR parameters
                       "x1": {"low": 0.0, "high": 1.0}, "x2": {"low": 0.0, "high": 1.0}},
        "replicates": 2,
        "targets": [{"name": "bowl", "observed": "simcal.models.synthetic:observed"}],
        "max_trials": 100_000,  # never reached: the release is uninstalled mid-run
    }}), encoding="utf-8")
    ours = "app.kubernetes.io/instance=regr"
    rate = f'simcal:trials_per_minute:rate5m{{study="{study}"}}'
    baseline = f'simcal:trials_per_minute:baseline3h{{study="{study}"}}'

    def refresh(prometheus: LivePrometheus) -> None:
        prometheus.update(
            json.loads(kubectl("get", "pods", "-l", ours, "-o", "json"))["items"],
            json.loads(kubectl("get", "services", "-l", ours, "-o", "json"))["items"],
        )

    def value(prometheus: LivePrometheus, expr: str) -> float | None:
        refresh(prometheus)
        result = prometheus.query(expr)
        return float(result[0]["value"][1]) if result else None

    live_from = time.time()
    prometheus = LivePrometheus(tmp_path, rules)
    try:
        helm("install", "regr", "./helm/simcal", "-f", CLUSTER / "values.yaml", "-f", values,
             "--timeout", "15m")
        wait_for(lambda: value(prometheus, f"{rate} > 0"), 1200, "the first trials")
        # A true 5m rate: five minutes and a half of the healthy run behind it.
        healthy_from = time.monotonic()
        while time.monotonic() - healthy_from < 330:
            value(prometheus, rate)
            time.sleep(5)
        healthy = value(prometheus, rate)
        assert healthy and healthy > 0, healthy
        assert not prometheus.query(baseline), "a baseline before any history was backfilled"
        prometheus.stop()

        history = tmp_path / "history.om"
        step, end = 30, int(live_from) - 30
        lines = ["# TYPE simcal:trials_per_minute:rate5m gauge"]
        lines += [f'simcal:trials_per_minute:rate5m{{study="{study}"}} {healthy} {t}'
                  for t in range(end - 4 * 3600, end + 1, step)]
        history.write_text("\n".join(lines) + "\n# EOF\n", encoding="utf-8")
        sh(promtool(), "tsdb", "create-blocks-from", "openmetrics", history, tmp_path / "data")

        prometheus = LivePrometheus(tmp_path, rules)
        measured = wait_for(lambda: value(prometheus, baseline), 300, "the baseline")
        assert abs(measured - healthy) < 1e-6 * healthy, (measured, healthy)
        now = wait_for(lambda: value(prometheus, rate), 300, "the live rate after the restart")
        assert now >= 0.7 * measured, (now, measured)  # healthy: the expression is false
        assert not [a for a in prometheus.api("alerts")["alerts"]
                    if a["labels"]["alertname"] == "SimcalThroughputRegression"]

        groups = json.loads(kubectl("get", "daskworkergroups", "-l", ours, "-o", "json"))["items"]
        assert len(groups) == 1, [g["metadata"]["name"] for g in groups]
        kubectl("patch", "daskworkergroup", groups[0]["metadata"]["name"], "--type", "merge",
                "-p", json.dumps({"spec": {"worker": {"replicas": 2}}}))
        wait_for(lambda: len(pods("dask.org/component=worker," + ours)) == 2, 600,
                 "the worker group to shrink to 2")

        states: list[str] = []

        def regression_alert() -> dict | None:
            refresh(prometheus)
            for alert in prometheus.api("alerts")["alerts"]:
                if alert["labels"]["alertname"] == "SimcalThroughputRegression" \
                        and alert["labels"].get("study") == study:
                    if not states or states[-1] != alert["state"]:
                        states.append(alert["state"])
                    return alert if alert["state"] == "firing" else None
            return None

        firing = wait_for(regression_alert, 1200, "SimcalThroughputRegression to fire")
        assert states[0] == "pending" and states[-1] == "firing", states
        assert float(firing["value"]) < 0.7 * measured, (firing, measured)
    finally:
        prometheus.stop()
    helm("uninstall", "regr", "--wait", "--timeout", "5m")
