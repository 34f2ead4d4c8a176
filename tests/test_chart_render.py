"""The Helm chart, rendered offline by the real Helm engine, checked against the Kubernetes
schemas, the Dask operator's CRDs and the operator's own builder functions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import helm_python
import pytest
import yaml
from dask_kubernetes.operator.controller import (
    build_scheduler_deployment_spec,
    build_scheduler_service_spec,
    build_worker_deployment_spec,
)

from chart import (
    CHART_DIR,
    DASHBOARD_FILE,
    DASK_APIS,
    RULES_FILE,
    container,
    default_values,
    env_map,
    expand_k8s_vars,
    find,
    find_all,
    notes,
    pod_specs,
    render,
    render_raw,
)
from kube_schemas import (
    crd_schema,
    is_custom,
    kube_versions,
    unknown_fields,
    validate_builtin,
    validate_custom_resource,
)
from monitoring import DESIGN_ALERTS

SCHEDULER = "tcp://simcal-scheduler.default.svc.cluster.local:8786"
OPERATOR_INSTALL = (
    "helm install --repo https://helm.dask.org --create-namespace -n dask-operator "
    "--generate-name dask-kubernetes-operator"
)
POSTGRES = {"storage": {"existingSecret": "simcal-db", "existingSecretKey": "url"}}
AUTOSCALER = {
    "autoscaler": {"enabled": True, "minimum": 4, "maximum": 20},
    "workers": {"minReplicas": 4},
}
MONITORING_OFF = {"monitoring": {"enabled": False}}

#: The value sets rendered and validated everywhere below.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "autoscaler": AUTOSCALER,
    "postgres-secret": POSTGRES,
    "monitoring-off": MONITORING_OFF,
    "driver-onfailure": {"driver": {"restartPolicy": "OnFailure", "ttlSecondsAfterFinished": None}},
    "tuned": {
        "workers": {
            "replicas": 3,
            "threads": 4,
            "resources": {"limits": {"memory": "6Gi", "cpu": 4}},
        },
        "scheduler": {"service": {"type": "LoadBalancer"}},
        "networkPolicy": {"dashboardFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
        "image": {"digest": "sha256:" + "a" * 64},
        "commonLabels": {"team": "epi"},
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in VALUE_SETS.items()}


@pytest.fixture(scope="module")
def default_objects(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered["defaults"]


def cluster_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "DaskCluster")


def driver_job(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "Job")


def driver_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return container(driver_job(objects)["spec"]["template"]["spec"], "driver")


# --- what gets rendered ---------------------------------------------------------------


def test_default_render_creates_the_documented_resources(default_objects):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in default_objects)
    expected = [
        ("ConfigMap", "simcal-calibration"),
        ("ConfigMap", "simcal-driver-template"),
        ("DaskCluster", "simcal"),
        ("Job", "simcal-driver-1"),
        ("NetworkPolicy", "simcal-driver"),
        ("NetworkPolicy", "simcal-scheduler"),
        ("NetworkPolicy", "simcal-workers"),
        ("PersistentVolumeClaim", "simcal-data"),
        ("PodDisruptionBudget", "simcal-scheduler"),
        ("PodMonitor", "simcal-workers"),
        ("Service", "simcal-driver"),
        ("ServiceAccount", "simcal"),
        ("ServiceMonitor", "simcal-driver"),
        ("ServiceMonitor", "simcal-scheduler"),
        ("Pod", "simcal-test-cluster"),
    ]
    if RULES_FILE.is_file():
        expected.append(("PrometheusRule", "simcal"))
    if DASHBOARD_FILE.is_file():
        expected.append(("ConfigMap", "simcal-dashboard"))
    assert kinds == sorted(expected)
    for obj in default_objects:
        assert obj["metadata"]["namespace"] == "default", obj["metadata"]["name"]
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "simcal"
        assert labels["app.kubernetes.io/instance"] == "simcal"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "simcal-0.1.0"


def test_chart_metadata():
    meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"] == ">=1.29.0-0"
    assert meta["appVersion"] == "0.1.0"
    values = default_values()
    assert values["image"]["repository"] == "ghcr.io/simcal/simcal"
    assert values["image"]["pullPolicy"] == "IfNotPresent"


def test_lint_strict_reports_nothing():
    # The operator check needs the CRD API, which lint cannot be told about: skip it here.
    report = helm_python.lint(CHART_DIR, {"operator": {"skipCheck": True}}, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report
    for kube in ("v1.29.0", "v1.33.0"):
        report = helm_python.lint(
            CHART_DIR, {"operator": {"skipCheck": True}}, strict=True, kube_version=kube
        )
        assert report["errors"] == [], (kube, report)


def test_lint_fails_on_a_broken_value():
    report = helm_python.lint(CHART_DIR, {"workers": {"replicas": -1}}, strict=True)
    assert report["errors"], "lint must report a schema violation"


# --- schema validation of every rendered object -----------------------------------------


def unique_objects(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for objects in rendered.values():
        for obj in objects:
            seen.setdefault(json.dumps(obj, sort_keys=True), obj)
    return list(seen.values())


@pytest.mark.parametrize("version", kube_versions())
def test_builtin_resources_validate_strictly(rendered, version):
    builtins = [o for o in unique_objects(rendered) if not is_custom(o)]
    assert {o["kind"] for o in builtins} >= {
        "ConfigMap",
        "Job",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Pod",
        "Service",
        "ServiceAccount",
    }
    for obj in builtins:
        validate_builtin(obj, version)


def test_dask_resources_validate_against_the_shipped_crds(rendered):
    dask = [
        o for o in unique_objects(rendered) if o["apiVersion"].startswith("kubernetes.dask.org/")
    ]
    assert {o["kind"] for o in dask} == {"DaskCluster", "DaskAutoscaler"}
    for obj in dask:
        validate_custom_resource(obj)


def test_crd_validation_catches_what_the_api_server_would_reject_or_drop(default_objects):
    """The validators themselves: an unquoted probe port, an unquoted quantity and a field
    the CRD does not know must all be caught."""
    cluster = json.loads(json.dumps(cluster_of(default_objects)))
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    worker["readinessProbe"]["httpGet"]["port"] = 8788
    with pytest.raises(AssertionError, match="readinessProbe"):
        validate_custom_resource(cluster)
    worker["readinessProbe"]["httpGet"]["port"] = "http-dashboard"
    worker["resources"]["limits"]["cpu"] = 1
    with pytest.raises(AssertionError, match="limits"):
        validate_custom_resource(cluster)
    worker["resources"]["limits"]["cpu"] = "1"
    worker["hostUsers"] = False
    cluster["spec"]["scheduler"]["spec"]["bogus"] = 1
    schema = crd_schema(cluster)
    assert sorted(unknown_fields(cluster, schema)) == [
        "spec.scheduler.spec.bogus",
        "spec.worker.spec.containers[0].hostUsers",
    ]


# --- the DaskCluster ------------------------------------------------------------------


def test_worker_container(default_objects):
    cluster = cluster_of(default_objects)
    assert cluster["metadata"]["name"] == "simcal"
    worker = cluster["spec"]["worker"]
    assert worker["replicas"] == 8
    c = container(worker["spec"], "worker")
    assert c["image"] == "ghcr.io/simcal/simcal:0.1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["args"] == [
        "dask",
        "worker",
        "--name",
        "$(DASK_WORKER_NAME)",
        "--nthreads",
        "1",
        "--memory-limit",
        "2Gi",
        "--dashboard",
        "--dashboard-address",
        "8788",
        "--local-directory",
        "/scratch",
    ]
    # The scheduler address comes from the operator (DASK_SCHEDULER_ADDRESS), not from us.
    assert "DASK_SCHEDULER_ADDRESS" not in env_map(c)
    assert env_map(c)["DASK_TEMPORARY_DIRECTORY"] == "/scratch"
    assert c["ports"] == [{"name": "http-dashboard", "containerPort": 8788, "protocol": "TCP"}]
    assert c["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": "1", "memory": "2Gi"},
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http-dashboard"}


def test_worker_threads_and_memory_limit_follow_values(rendered):
    c = container(cluster_of(rendered["tuned"])["spec"]["worker"]["spec"], "worker")
    args = c["args"]
    assert args[args.index("--nthreads") + 1] == "4"
    assert args[args.index("--memory-limit") + 1] == "6Gi"
    # Unquoted numbers in values are rendered as strings (the CRD types quantities as strings).
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "6Gi"}
    assert cluster_of(rendered["tuned"])["spec"]["worker"]["replicas"] == 3


def test_memory_limit_is_auto_without_a_memory_limit():
    objects = render({"workers": {"resources": {"limits": None}}})
    args = container(cluster_of(objects)["spec"]["worker"]["spec"], "worker")["args"]
    assert args[args.index("--memory-limit") + 1] == "auto"


def test_scheduler_container_and_service(default_objects):
    scheduler = cluster_of(default_objects)["spec"]["scheduler"]
    c = container(scheduler["spec"], "scheduler")
    assert c["args"] == ["dask", "scheduler", "--port", "8786", "--dashboard-address", ":8787"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "tcp-comm": 8786,
        "http-dashboard": 8787,
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "http-dashboard"
        assert isinstance(c[probe]["httpGet"]["port"], str)
    service = scheduler["service"]
    assert service["selector"] == {
        "dask.org/cluster-name": "simcal",
        "dask.org/component": "scheduler",
    }
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]} == {
        "tcp-comm": (8786, "tcp-comm"),
        "http-dashboard": (8787, "http-dashboard"),
    }


def test_operator_builds_valid_scheduler_and_worker_objects(default_objects):
    """Feed our specs to the operator's own builders (the functions its handlers call) and
    check what it would create."""
    cluster = cluster_of(default_objects)
    name = cluster["metadata"]["name"]
    cluster_labels = cluster["metadata"]["labels"]
    scheduler = cluster["spec"]["scheduler"]
    worker = cluster["spec"]["worker"]

    # Glue as in daskcluster_create_components: cluster labels + scheduler metadata labels.
    s_labels = cluster_labels | scheduler["metadata"]["labels"]
    s_annotations = scheduler["metadata"]["annotations"]
    deployment = build_scheduler_deployment_spec(name, scheduler["spec"], s_annotations, s_labels)
    service = build_scheduler_service_spec(name, scheduler["service"], s_annotations, s_labels)
    w_labels = cluster_labels | worker["metadata"]["labels"]
    workers = build_worker_deployment_spec(
        worker_group_name=f"{name}-default",
        namespace="default",
        cluster_name=name,
        uuid="0123456789",
        pod_spec=worker["spec"],
        annotations=worker["metadata"]["annotations"],
        labels=w_labels,
    )
    for obj in (deployment, service, workers):
        obj["metadata"]["namespace"] = "default"
        validate_builtin(obj, kube_versions()[-1])
        validate_builtin(obj, kube_versions()[0])

    assert service["metadata"]["name"] == "simcal-scheduler"
    scheduler_pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= scheduler_pod_labels.items()

    pod = workers["spec"]["template"]["spec"]
    c = container(pod, "worker")
    env = env_map(c)
    assert env["DASK_WORKER_NAME"] == "simcal-default-worker-0123456789"
    assert env["DASK_SCHEDULER_ADDRESS"] == SCHEDULER
    args = [expand_k8s_vars(a, env) for a in c["args"]]
    assert args[:4] == ["dask", "worker", "--name", "simcal-default-worker-0123456789"]
    assert c["ports"][0]["name"] == "http-dashboard"
    # The driver talks to the very address the operator hands the workers.
    driver_args = driver_container(default_objects)["args"]
    assert driver_args[driver_args.index("--scheduler") + 1] == env["DASK_SCHEDULER_ADDRESS"]
    for built in (pod, deployment["spec"]["template"]["spec"]):
        assert built["securityContext"]["runAsNonRoot"] is True
        assert built["automountServiceAccountToken"] is False
        for ctr in built["containers"]:
            assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
            assert ctr["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_args_parse_with_the_real_command_lines(default_objects):
    """The flags exist: parse the args with dask's own click commands and simcal's parser."""
    from distributed.cli.dask_scheduler import main as dask_scheduler
    from distributed.cli.dask_worker import main as dask_worker

    cluster = cluster_of(default_objects)
    w_args = container(cluster["spec"]["worker"]["spec"], "worker")["args"]
    env = {"DASK_WORKER_NAME": "simcal-default-worker-0123456789"}
    params = dask_worker.make_context(
        "worker", [expand_k8s_vars(a, env) for a in w_args[2:]]
    ).params
    assert params["name"] == "simcal-default-worker-0123456789"
    assert (params["nthreads"], params["memory_limit"]) == (1, "2Gi")
    assert (params["dashboard"], params["dashboard_address"]) == (True, "8788")
    assert params["local_directory"] == "/scratch"
    assert params["scheduler"] is None and not params["preload_argv"]  # from the env, nothing stray
    s_args = container(cluster["spec"]["scheduler"]["spec"], "scheduler")["args"]
    params = dask_scheduler.make_context("scheduler", s_args[2:]).params
    assert (params["port"], params["dashboard_address"]) == ("8786", ":8787")
    assert not params["preload_argv"]

    cli = pytest.importorskip("simcal.cli")
    d_args = driver_container(default_objects)["args"]
    assert d_args[0] == "simcal"
    parsed = cli.build_parser().parse_args(d_args[1:])
    assert parsed.command == "run"
    assert (parsed.scheduler, parsed.min_workers, parsed.metrics_port) == (SCHEDULER, 8, 8000)
    assert (parsed.metrics_linger, parsed.connect_timeout) == (60, 900)
    assert parsed.storage == "sqlite:////data/simcal.db"
    assert str(parsed.config) == "/etc/simcal/calibration.yaml"


def test_operator_check_fails_without_the_crd_api():
    with pytest.raises(helm_python.HelmRenderError) as excinfo:
        render(api_versions=())
    message = str(excinfo.value)
    assert "kubernetes.dask.org/v1/DaskCluster" in message
    assert OPERATOR_INSTALL in message
    assert "operator.skipCheck" in message
    # Only the operator APIs are needed, not the Prometheus Operator's.
    assert find(render(api_versions=DASK_APIS), "DaskCluster")


def test_skip_check_renders_without_the_crd_api():
    objects = render({"operator": {"skipCheck": True}}, api_versions=())
    assert find(objects, "DaskCluster")["metadata"]["name"] == "simcal"
    # Without monitoring.coreos.com/v1 "auto" leaves the Prometheus Operator objects out ...
    assert not find_all(objects, "ServiceMonitor") and not find_all(objects, "PodMonitor")
    assert not find_all(objects, "PrometheusRule")


def test_prometheus_operator_always_renders_monitors_without_the_api():
    objects = render({"monitoring": {"prometheusOperator": "always"}}, api_versions=DASK_APIS)
    assert len(find_all(objects, "ServiceMonitor")) == 2
    assert len(find_all(objects, "PodMonitor")) == 1
    never = render({"monitoring": {"prometheusOperator": "never"}})
    assert not find_all(never, "ServiceMonitor")
    assert find(never, "Service", "simcal-driver")  # the Service stays for port-forward


def test_cluster_name_longer_than_the_operator_allows_fails():
    with pytest.raises(helm_python.HelmRenderError, match="at most 53"):
        render(name="a" * 50)  # DaskCluster "aaa...-simcal", 57 characters
    with pytest.raises(helm_python.HelmValuesError, match="fullnameOverride"):
        render({"fullnameOverride": "a" * 54})
    assert (
        find(render({"fullnameOverride": "b" * 53}), "DaskCluster")["metadata"]["name"] == "b" * 53
    )


# --- autoscaler and worker counts -----------------------------------------------------


def test_autoscaler(rendered):
    objects = rendered["autoscaler"]
    autoscaler = find(objects, "DaskAutoscaler")
    assert autoscaler["spec"] == {"cluster": "simcal", "minimum": 4, "maximum": 20}
    args = driver_container(objects)["args"]
    assert args[args.index("--min-workers") + 1] == "4"
    assert not find_all(rendered["defaults"], "DaskAutoscaler")


def test_autoscaler_minimum_defaults_to_the_configured_minimum():
    objects = render({"autoscaler": {"enabled": True}, "workers": {"minReplicas": 5}})
    assert find(objects, "DaskAutoscaler")["spec"]["minimum"] == 5
    objects = render({"autoscaler": {"enabled": True, "minimum": 3}})
    assert find(objects, "DaskAutoscaler")["spec"]["minimum"] == 3
    args = driver_container(objects)["args"]
    assert args[args.index("--min-workers") + 1] == "3"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"autoscaler": {"enabled": True, "minimum": 2}, "workers": {"minReplicas": 4}},
            r"autoscaler.minimum \(2\) is below workers.minReplicas \(4\)",
        ),
        (
            {"autoscaler": {"enabled": True, "minimum": 6, "maximum": 5}},
            r"autoscaler.maximum \(5\) is below autoscaler.minimum \(6\)",
        ),
        (
            {"workers": {"replicas": 4, "minReplicas": 6}},
            r"workers.minReplicas \(6\) exceeds workers.replicas \(4\)",
        ),
    ],
)
def test_inconsistent_worker_counts_fail(values, message):
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


# --- the driver -----------------------------------------------------------------------


def test_driver_job(default_objects):
    job = driver_job(default_objects)
    assert job["metadata"]["name"] == "simcal-driver-1"
    assert job["spec"]["backoffLimit"] == 6
    assert job["spec"]["ttlSecondsAfterFinished"] == 604800
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "driver", "operator": "In", "values": [2]},
    }
    c = container(pod, "driver")
    assert c["args"] == [
        "simcal",
        "run",
        "--config",
        "/etc/simcal/calibration.yaml",
        "--scheduler",
        SCHEDULER,
        "--metrics-port",
        "8000",
        "--min-workers",
        "8",
        "--metrics-linger",
        "60",
        "--connect-timeout",
        "900",
        "--storage",
        "sqlite:////data/simcal.db",
    ]
    assert c["ports"] == [{"name": "metrics", "containerPort": 8000, "protocol": "TCP"}]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/simcal"]]["configMap"]["name"] == "simcal-calibration"
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "simcal-data"
    assert "SIMCAL_STORAGE" not in env_map(c)
    assert pod["terminationGracePeriodSeconds"] == 60  # grace_period 30 s + 30 s
    pvc = find(default_objects, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"


def test_restart_policy_on_failure_has_no_pod_failure_policy(rendered):
    job = driver_job(rendered["driver-onfailure"])
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert "podFailurePolicy" not in job["spec"] and "ttlSecondsAfterFinished" not in job["spec"]


def test_each_revision_gets_its_own_driver_job():
    objects = render(revision=7)
    assert driver_job(objects)["metadata"]["name"] == "simcal-driver-7"
    long = render({"fullnameOverride": "x" * 53}, revision=123456)
    assert len(driver_job(long)["metadata"]["name"]) <= 63


def test_postgres_secret_storage(rendered):
    objects = rendered["postgres-secret"]
    c = driver_container(objects)
    assert env_map(c)["SIMCAL_STORAGE"] == {"secretKeyRef": {"name": "simcal-db", "key": "url"}}
    assert "--storage" not in c["args"]
    assert "/data" not in {m["mountPath"] for m in c["volumeMounts"]}
    assert not find_all(objects, "PersistentVolumeClaim")
    # No storage URL anywhere: only the scheduler's (tcp, http) and web links.
    text = json.dumps(objects)
    assert set(re.findall(r"([a-z][a-z0-9+.-]*)://", text)) <= {"tcp", "http", "https"}
    assert "sqlite:" not in text


def test_existing_claim_is_used_and_not_created():
    objects = render({"storage": {"persistence": {"existingClaim": "my-study"}}})
    assert not find_all(objects, "PersistentVolumeClaim")
    volumes = driver_job(objects)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "my-study"}} in volumes


def test_calibration_configmap_is_the_calibration_block(default_objects):
    cm = find(default_objects, "ConfigMap", "simcal-calibration")
    config = yaml.safe_load(cm["data"]["calibration.yaml"])
    assert config == default_values()["calibration"]
    simcal_config = pytest.importorskip("simcal.config")
    validated = simcal_config.validate_config(config)  # the real config validation
    assert validated.study == "seir-demo"


def test_driver_can_be_disabled():
    objects = render({"driver": {"enabled": False}})
    assert not find_all(objects, "Job")
    assert find(objects, "DaskCluster")


# --- monitoring -----------------------------------------------------------------------


def test_driver_service_and_servicemonitor_give_job_simcal_driver(default_objects):
    service = find(default_objects, "Service", "simcal-driver")
    monitor = find(default_objects, "ServiceMonitor", "simcal-driver")
    pod = driver_job(default_objects)["spec"]["template"]
    # ServiceMonitor -> Service -> driver pod -> container port.
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["default"]}
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in {p["name"] for p in container(pod["spec"], "driver")["ports"]}
    # Prometheus Operator: job = value of the Service label named by jobLabel.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "simcal-driver"


def test_scheduler_servicemonitor_selects_the_operator_service(default_objects):
    cluster = cluster_of(default_objects)
    scheduler = cluster["spec"]["scheduler"]
    labels = cluster["metadata"]["labels"] | scheduler["metadata"]["labels"]
    service = build_scheduler_service_spec("simcal", scheduler["service"], {}, labels)
    monitor = find(default_objects, "ServiceMonitor", "simcal-scheduler")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "simcal-scheduler"
    endpoint = monitor["spec"]["endpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http-dashboard", "/metrics")
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_worker_podmonitor_selects_the_operator_worker_pods(default_objects):
    cluster = cluster_of(default_objects)
    worker = cluster["spec"]["worker"]
    deployment = build_worker_deployment_spec(
        "simcal-default",
        "default",
        "simcal",
        "abc",
        worker["spec"],
        {},
        cluster["metadata"]["labels"] | worker["metadata"]["labels"],
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    monitor = find(default_objects, "PodMonitor", "simcal-workers")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels[monitor["spec"]["jobLabel"]] == "simcal-workers"
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    ports = {
        p["name"] for p in container(deployment["spec"]["template"]["spec"], "worker")["ports"]
    }
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


def test_scrape_annotations(default_objects, rendered):
    cluster = cluster_of(default_objects)
    pods = {
        "8000": driver_job(default_objects)["spec"]["template"]["metadata"],
        "8787": cluster["spec"]["scheduler"]["metadata"],
        "8788": cluster["spec"]["worker"]["metadata"],
    }
    for port, meta in pods.items():
        assert meta["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": port,
            "prometheus.io/path": "/metrics",
        }
    off = rendered["monitoring-off"]
    assert "prometheus.io/scrape" not in json.dumps(off)


def test_monitoring_off(rendered):
    objects = rendered["monitoring-off"]
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not any(o["metadata"]["name"] == "simcal-driver" for o in find_all(objects, "Service"))
    assert all(
        "grafana_dashboard" not in o["metadata"]["labels"] for o in find_all(objects, "ConfigMap")
    )
    # Nobody may reach the driver; Prometheus is no longer a peer anywhere.
    assert find(objects, "NetworkPolicy", "simcal-driver")["spec"]["ingress"] == []
    assert "prometheus" not in json.dumps(find_all(objects, "NetworkPolicy"))


def test_throughput_regression_for_is_the_only_change_a_value_makes():
    """monitoring.prometheusRule.throughputRegressionFor shortens SimcalThroughputRegression's
    `for:` (the live cluster's test of the alert); every other rule stays as the file has it."""
    rule = find(render({"monitoring": {"prometheusRule": {"throughputRegressionFor": "1m"}}}),
                "PrometheusRule")
    expected = yaml.safe_load(RULES_FILE.read_text())["groups"]
    for group in expected:
        for source in group["rules"]:
            if source.get("alert") == "SimcalThroughputRegression":
                assert source["for"] == "10m"
                source["for"] = "1m"
    assert rule["spec"] == {"groups": expected}
    with pytest.raises(helm_python.HelmValuesError, match="throughputRegressionFor"):
        render({"monitoring": {"prometheusRule": {"throughputRegressionFor": "soon"}}})


def test_prometheus_rule_comes_from_the_rules_file(default_objects):
    rule = find(default_objects, "PrometheusRule")
    source = yaml.safe_load(RULES_FILE.read_text())
    assert rule["spec"] == {"groups": source["groups"]}
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert alerts >= DESIGN_ALERTS
    assert "simcal:trials_per_minute:rate5m" in {r.get("record") for r in rules}
    # Every job matcher in the rules must select a job this chart produces.
    exprs = " ".join(str(r["expr"]) for r in rules)
    matchers = re.findall(r'\bjob\s*(=~|=)\s*"([^"]+)"', exprs)
    assert matchers, "no rule selects a job: SimcalDriverDown needs one"
    chart_jobs = {"simcal-driver", "simcal-scheduler", "simcal-workers"}
    for op, value in matchers:
        hits = {j for j in chart_jobs if (re.fullmatch(value, j) if op == "=~" else value == j)}
        assert hits, f'job{op}"{value}" matches none of the chart\'s jobs {sorted(chart_jobs)}'
    driver_down = next(r for r in rules if r.get("alert") == "SimcalDriverDown")
    assert any(
        re.fullmatch(v, "simcal-driver") if op == "=~" else v == "simcal-driver"
        for op, v in re.findall(r'\bjob\s*(=~|=)\s*"([^"]+)"', str(driver_down["expr"]))
    ), "SimcalDriverDown does not select the chart's driver job"


def test_grafana_dashboard_configmap(default_objects):
    cm = find(default_objects, "ConfigMap", "simcal-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = cm["data"]
    assert json.loads(cm["data"][key]) == json.loads(DASHBOARD_FILE.read_text())
    moved = render({"monitoring": {"grafanaDashboard": {"namespace": "grafana"}}})
    assert find(moved, "ConfigMap", "simcal-dashboard")["metadata"]["namespace"] == "grafana"


# --- hardening --------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_pod_is_hardened(rendered, value_set):
    specs = pod_specs(rendered[value_set])
    assert len(specs) >= 3
    for where, pod in specs.items():
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert csc["capabilities"] == {"drop": ["ALL"]}, where
            assert csc["runAsNonRoot"] is True and csc["runAsUser"] == 1000, where
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            for path in ("/tmp", "/home/simcal"):
                assert "emptyDir" in volumes[mounts[path]], (where, path)
            assert env_map(c)["HOME"] == "/home/simcal", where
            assert set(mounts.values()) <= set(volumes), where
            assert c["resources"]["requests"], where
    workers = [pod for where, pod in specs.items() if where.endswith("/worker")]
    for pod in workers:
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mounts["/scratch"]]


def test_service_account_has_no_token(default_objects):
    sa = find(default_objects, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    for pod in pod_specs(default_objects).values():
        assert pod["serviceAccountName"] == "simcal"


def test_network_policies(default_objects):
    release = {"app.kubernetes.io/name": "simcal", "app.kubernetes.io/instance": "simcal"}
    scheduler = find(default_objects, "NetworkPolicy", "simcal-scheduler")["spec"]
    assert scheduler["podSelector"]["matchLabels"] == {
        "dask.org/cluster-name": "simcal",
        "dask.org/component": "scheduler",
    }
    comm_rules = [
        r for r in scheduler["ingress"] if {"protocol": "TCP", "port": 8786} in r["ports"]
    ]
    assert len(comm_rules) == 1
    assert comm_rules[0]["from"] == [{"podSelector": {"matchLabels": release}}]
    other = [r for r in scheduler["ingress"] if r is not comm_rules[0]]
    assert all(r["ports"] == [{"protocol": "TCP", "port": 8787}] for r in other)
    peers = [p for r in other for p in r["from"]]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dask-operator"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "dask-kubernetes-operator"}},
    } in peers
    assert {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    } in peers
    # Every pod of the release carries the labels the comm-port rule admits.
    cluster = cluster_of(default_objects)
    for meta in (
        driver_job(default_objects)["spec"]["template"]["metadata"],
        find(default_objects, "Pod")["metadata"],
        {"labels": cluster["metadata"]["labels"] | cluster["spec"]["worker"]["metadata"]["labels"]},
    ):
        assert release.items() <= meta["labels"].items()
    driver = find(default_objects, "NetworkPolicy", "simcal-driver")["spec"]
    assert [r["ports"] for r in driver["ingress"]] == [[{"protocol": "TCP", "port": 8000}]]


def test_network_policy_peers_are_configurable(rendered):
    objects = render(
        {"networkPolicy": {"prometheus": {"namespaceSelector": {"matchLabels": {"x": "y"}}}}}
    )
    driver = find(objects, "NetworkPolicy", "simcal-driver")["spec"]
    assert driver["ingress"][0]["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"x": "y"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    tuned = find(rendered["tuned"], "NetworkPolicy", "simcal-scheduler")["spec"]
    assert {"ipBlock": {"cidr": "10.0.0.0/8"}} in tuned["ingress"][1]["from"]
    assert not find_all(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_scheduler_pdb_selects_the_scheduler_pod(default_objects):
    pdb = find(default_objects, "PodDisruptionBudget")
    cluster = cluster_of(default_objects)
    scheduler = cluster["spec"]["scheduler"]
    deployment = build_scheduler_deployment_spec(
        "simcal",
        scheduler["spec"],
        {},
        cluster["metadata"]["labels"] | scheduler["metadata"]["labels"],
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 0


# --- helm test and NOTES ----------------------------------------------------------------


def test_helm_test_pod(rendered):
    for name, values in (("defaults", 8), ("autoscaler", 4)):
        pod = find(rendered[name], "Pod")
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        c = container(pod["spec"], "check")
        assert c["image"] == driver_container(rendered[name])["image"]
        env = env_map(c)
        assert env["SCHEDULER_ADDRESS"] == SCHEDULER
        assert env["EXPECTED_WORKERS"] == str(values)
        assert c["args"][:2] == ["python", "-c"]
        script = c["args"][2]
        compile(script, "helm-test", "exec")  # the script is valid Python
        assert "wait_for_workers" in script and "/health" in script
        assert pod["spec"]["restartPolicy"] == "Never"


def test_helm_test_script_against_a_real_scheduler(default_objects):
    """Run the test pod's script against a small in-process Dask cluster: it passes when the
    workers are there and fails (non-zero exit) when fewer joined than expected."""
    from distributed import LocalCluster

    c = container(find(default_objects, "Pod")["spec"], "check")
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        env = {
            **os.environ,
            **{k: v for k, v in env_map(c).items() if isinstance(v, str) and k != "HOME"},
            "SCHEDULER_ADDRESS": cluster.scheduler.address,
            "DASHBOARD_URL": cluster.dashboard_link.rsplit("/", 1)[0],
        }
        command = [sys.executable, *c["args"][1:]]  # "python" of this venv
        ok = subprocess.run(
            command,
            env={**env, "EXPECTED_WORKERS": "2", "TIMEOUT_SECONDS": "60"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert ok.returncode == 0, ok.stderr
        assert "2 workers joined" in ok.stdout and "/health: 200" in ok.stdout
        short = subprocess.run(
            command,
            env={**env, "EXPECTED_WORKERS": "3", "TIMEOUT_SECONDS": "2"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert short.returncode != 0
        assert "2/3 workers" in short.stderr


def test_notes_explain_job_dashboard_and_metrics():
    text = notes()
    assert "kubectl -n default logs -f job/simcal-driver-1" in text
    assert "kubectl -n default port-forward svc/simcal-scheduler 8787:8787" in text
    assert "port-forward svc/simcal-driver 8000:8000" in text
    assert "kubectl -n default port-forward job/simcal-driver-1 8000" in text  # the live fit
    assert "http://localhost:8000/report/" in text
    assert 'job="simcal-driver"' in text
    assert "helm test simcal" in text
    assert "not served" in notes(api_versions=DASK_APIS)


def test_image_tag_and_digest(rendered):
    assert (
        driver_container(rendered["tuned"])["image"] == "ghcr.io/simcal/simcal@sha256:" + "a" * 64
    )
    objects = render({"image": {"tag": "0.2.0", "repository": "registry.example/simcal"}})
    images = {c["image"] for pod in pod_specs(objects).values() for c in pod["containers"]}
    assert images == {"registry.example/simcal:0.2.0"}


# template functions whose output changes from one render to the next (or with the cluster's
# state): a chart calling one makes every `helm upgrade` roll pods or rotate secrets
NONDETERMINISTIC = re.compile(
    r"(?<![.\w$])(rand(Alpha|AlphaNum|Numeric|Ascii|Bytes|Int)|uuidv4|now|unixEpoch|genCA|genPrivateKey"
    r"|genSelfSignedCert|genSignedCert|lookup|htpasswd|bcrypt|shuffle)\b"
)


def nondeterministic_calls(template: str) -> list[str]:
    """The nondeterministic functions called inside the template's ``{{ ... }}`` actions."""
    actions = re.findall(r"\{\{(.*?)\}\}", template, flags=re.S)
    return [m.group(1) for action in actions for m in NONDETERMINISTIC.finditer(action)]


def test_render_is_deterministic():
    """Two renders agree, and no template calls a function that would make them differ (the
    check itself catches one)."""
    templates = sorted(p for p in (CHART_DIR / "templates").rglob("*") if p.is_file())
    assert templates
    calls = {str(t): nondeterministic_calls(t.read_text()) for t in templates}
    assert {name: found for name, found in calls.items() if found} == {}
    assert nondeterministic_calls("token: {{ randAlphaNum 16 | b64enc }}") == ["randAlphaNum"]
    assert nondeterministic_calls("# rotate now\n{{ .Values.now }}") == []
    assert render_raw() == render_raw()


def test_every_probe_is_built_by_the_one_probe_helper(default_objects):
    """simcal.httpProbe writes every field; a probe written by hand (driver's was) lacks some."""
    fields = {"httpGet", "initialDelaySeconds", "periodSeconds", "timeoutSeconds",
              "failureThreshold"}
    probes = {
        f"{key}/{container['name']}/{kind}": container[kind]
        for key, spec in pod_specs(default_objects).items()
        for container in spec["containers"]
        for kind in ("readinessProbe", "livenessProbe")
        if kind in container
    }
    assert any("driver" in key for key in probes), sorted(probes)
    for key, probe in probes.items():
        assert set(probe) == fields, (key, probe)
