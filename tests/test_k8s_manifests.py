"""The plain manifests in k8s/: valid for the API server, accepted by the Dask operator's
builders, and in step with the Helm chart."""

from __future__ import annotations

from typing import Any

import dask.config
import pytest
import yaml
from dask_kubernetes.operator.controller import (
    build_cluster_spec,
    build_job_pod_spec,
    build_scheduler_deployment_spec,
    build_scheduler_service_spec,
    build_worker_deployment_spec,
)

from chart import (
    K8S_DIR,
    container,
    default_values,
    env_map,
    expand_k8s_vars,
    find,
    load_yaml_docs,
    pod_specs,
    render,
)
from kube_schemas import is_custom, kube_versions, validate_builtin, validate_custom_resource
from simcal.cluster import QUIET_DASK

CALIBRATION_JOB = K8S_DIR / "calibration-job.yaml"
DASKJOB = K8S_DIR / "daskjob.yaml"
README = K8S_DIR / "README.md"


@pytest.fixture(scope="module")
def chart_objects() -> list[dict[str, Any]]:
    # The release the kubectl Job runs against: "simcal" in "default", default values.
    return render(name="simcal", namespace="default")


@pytest.fixture(scope="module")
def calibration_job() -> dict[str, Any]:
    (job,) = load_yaml_docs(CALIBRATION_JOB)
    return job


@pytest.fixture(scope="module")
def daskjob_docs() -> list[dict[str, Any]]:
    return load_yaml_docs(DASKJOB)


@pytest.fixture(scope="module")
def daskjob(daskjob_docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(daskjob_docs, "DaskJob")


def all_k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S_DIR.glob("*.yaml")) for doc in load_yaml_docs(path)]


def test_k8s_dir_has_the_two_manifests_and_a_readme():
    # Every manifest in k8s/ is validated below, whatever its name.
    assert {p.name for p in K8S_DIR.glob("*.yaml")} >= {"calibration-job.yaml", "daskjob.yaml"}
    text = README.read_text(encoding="utf-8")
    for needle in (
        "kubectl create -f k8s/calibration-job.yaml",
        "k8s/daskjob.yaml",
        "helm/simcal/files/prometheus-rules.yaml",
        "DASK_SCHEDULER_ADDRESS",
    ):
        assert needle in text, needle


@pytest.mark.parametrize("version", kube_versions())
def test_builtin_objects_validate_strictly(version):
    builtins = [o for o in all_k8s_objects() if not is_custom(o)]
    assert {o["kind"] for o in builtins} >= {"Job", "ConfigMap", "PersistentVolumeClaim"}
    for obj in builtins:
        validate_builtin(obj, version)


def test_dask_objects_validate_against_the_shipped_crds():
    dask = [o for o in all_k8s_objects() if is_custom(o)]
    assert "DaskJob" in {o["kind"] for o in dask}
    for obj in dask:
        validate_custom_resource(obj)


# --- calibration-job.yaml ---------------------------------------------------------------


def test_calibration_job_is_for_kubectl_create(calibration_job):
    meta = calibration_job["metadata"]
    assert "name" not in meta and meta["generateName"] == "simcal-calibration-"
    assert meta["namespace"] == "default"
    volumes = {v["name"]: v for v in calibration_job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "simcal-calibration"


def test_calibration_job_is_generated_from_the_chart_and_not_stale():
    """k8s/calibration-job.yaml is `make k8s-manifests` output for the chart as it is now."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "k8s_manifests", K8S_DIR.parent / "scripts" / "k8s_manifests.py"
    )
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert CALIBRATION_JOB.read_text(encoding="utf-8") == generator.calibration_job(), (
        "k8s/calibration-job.yaml is stale: run `make k8s-manifests`"
    )


def test_calibration_job_pod_is_the_charts_driver_pod(calibration_job, chart_objects):
    chart_job = find(chart_objects, "Job")
    # Same image, command, args, env, mounts, probes, resources and security context.
    assert calibration_job["spec"]["template"]["spec"] == chart_job["spec"]["template"]["spec"]
    for key in ("backoffLimit", "podFailurePolicy", "ttlSecondsAfterFinished"):
        assert calibration_job["spec"][key] == chart_job["spec"][key], key
    # What the Job mounts exists in the release.
    assert find(chart_objects, "ConfigMap", "simcal-calibration")
    assert find(chart_objects, "PersistentVolumeClaim", "simcal-data")
    assert find(chart_objects, "ServiceAccount", "simcal")


def test_calibration_job_is_admitted_and_scraped_like_the_charts_driver(
    calibration_job, chart_objects
):
    labels = calibration_job["spec"]["template"]["metadata"]["labels"]
    scheduler_policy = find(chart_objects, "NetworkPolicy", "simcal-scheduler")
    comm_peer = scheduler_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert comm_peer.items() <= labels.items(), "the scheduler NetworkPolicy would block it"
    service = find(chart_objects, "Service", "simcal-driver")
    assert service["spec"]["selector"].items() <= labels.items()
    driver_policy = find(chart_objects, "NetworkPolicy", "simcal-driver")
    assert driver_policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    chart_pod = find(chart_objects, "Job")["spec"]["template"]["metadata"]
    assert (
        calibration_job["spec"]["template"]["metadata"]["annotations"] == chart_pod["annotations"]
    )


# --- daskjob.yaml -----------------------------------------------------------------------


def test_daskjob_is_self_contained(daskjob_docs, daskjob):
    name = daskjob["metadata"]["name"]
    job_pod = daskjob["spec"]["job"]["spec"]
    volumes = {v["name"]: v for v in job_pod["volumes"]}
    config = find(daskjob_docs, "ConfigMap", volumes["config"]["configMap"]["name"])
    assert find(
        daskjob_docs, "PersistentVolumeClaim", volumes["data"]["persistentVolumeClaim"]["claimName"]
    )
    # Its calibration is the chart's default one.
    assert yaml.safe_load(config["data"]["calibration.yaml"]) == default_values()["calibration"]
    cluster = daskjob["spec"]["cluster"]["spec"]
    assert cluster["worker"]["replicas"] == 8
    # The operator names the cluster after the DaskJob: the Service selector must match.
    assert cluster["scheduler"]["service"]["selector"] == {
        "dask.org/cluster-name": name,
        "dask.org/component": "scheduler",
    }
    assert "serviceAccountName" not in job_pod  # no chart ServiceAccount to rely on


def test_daskjob_containers_are_the_charts(daskjob, chart_objects):
    chart_cluster = find(chart_objects, "DaskCluster")["spec"]
    cluster = daskjob["spec"]["cluster"]["spec"]
    for role in ("scheduler", "worker"):
        ours = container(cluster[role]["spec"], role)
        assert ours == container(chart_cluster[role]["spec"], role), role
        assert (
            cluster[role]["spec"]["securityContext"]
            == chart_cluster[role]["spec"]["securityContext"]
        )
        assert cluster[role]["spec"]["volumes"] == chart_cluster[role]["spec"]["volumes"]
    assert {p["name"]: p for p in cluster["scheduler"]["service"]["ports"]} == {
        p["name"]: p for p in chart_cluster["scheduler"]["service"]["ports"]
    }

    driver = container(daskjob["spec"]["job"]["spec"], "driver")
    chart_driver = container(find(chart_objects, "Job")["spec"]["template"]["spec"], "driver")
    # Same container but for the scheduler address, which the operator provides here.
    args = list(driver["args"])
    index = args.index("--scheduler")
    assert args[index + 1] == "$(DASK_SCHEDULER_ADDRESS)"
    args[index + 1] = chart_driver["args"][index + 1]
    assert args == chart_driver["args"]
    assert {**driver, "args": args} == chart_driver


def test_the_charts_dask_containers_run_quiet_as_the_local_cluster(chart_objects):
    """The chart's scheduler and workers get QUIET_DASK (simcal/cluster.py) as DASK_* variables,
    read as Dask reads them; the DaskJob's containers are the chart's (test above)."""
    cluster = find(chart_objects, "DaskCluster")["spec"]
    for role in ("scheduler", "worker"):
        env = {
            name: value
            for name, value in env_map(container(cluster[role]["spec"], role)).items()
            if name.startswith("DASK_") and isinstance(value, str)
        }
        config = dask.config.collect_env(env)
        read = {key: dask.config.get(key, default=None, config=config) for key in QUIET_DASK}
        assert read == QUIET_DASK, role


def test_operator_builds_the_daskjob_pods(daskjob):
    """The operator's own builders (as in daskjob_create_components) accept the DaskJob and
    give the driver the scheduler address its --scheduler argument expands to."""
    name, namespace = daskjob["metadata"]["name"], "simcal-test"
    labels = daskjob["metadata"]["labels"]
    spec = daskjob["spec"]

    cluster = build_cluster_spec(
        name, spec["cluster"]["spec"]["worker"], spec["cluster"]["spec"]["scheduler"], {}, labels
    )
    cluster["metadata"]["namespace"] = namespace
    validate_custom_resource(cluster)

    job_labels = labels | spec["job"]["metadata"]["labels"]
    pod = build_job_pod_spec(
        job_name=name,
        cluster_name=name,
        namespace=namespace,
        spec=spec["job"]["spec"],
        annotations=spec["job"]["metadata"]["annotations"],
        labels=job_labels,
    )
    pod["metadata"]["namespace"] = namespace
    for version in (kube_versions()[0], kube_versions()[-1]):
        validate_builtin(pod, version)
    driver = container(pod["spec"], "driver")
    env = env_map(driver)
    address = f"tcp://{name}-scheduler.{namespace}.svc.cluster.local:8786"
    assert env["DASK_SCHEDULER_ADDRESS"] == address
    args = [expand_k8s_vars(a, env) for a in driver["args"]]
    assert args[args.index("--scheduler") + 1] == address
    assert pod["metadata"]["name"] == f"{name}-runner"
    assert pod["metadata"]["labels"]["dask.org/component"] == "job-runner"

    scheduler = cluster["spec"]["scheduler"]
    deployment = build_scheduler_deployment_spec(name, scheduler["spec"], {}, labels)
    service = build_scheduler_service_spec(name, scheduler["service"], {}, labels)
    workers = build_worker_deployment_spec(
        f"{name}-default",
        namespace,
        name,
        "0000000000",
        cluster["spec"]["worker"]["spec"],
        {},
        labels,
    )
    for obj in (deployment, service, workers):
        obj["metadata"]["namespace"] = namespace
        validate_builtin(obj, kube_versions()[-1])
    assert service["metadata"]["name"] == f"{name}-scheduler"  # what the address points at
    scheduler_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= scheduler_labels.items()
    worker_env = env_map(container(workers["spec"]["template"]["spec"], "worker"))
    assert worker_env["DASK_SCHEDULER_ADDRESS"] == address
    assert worker_env["DASK_WORKER_NAME"] == f"{name}-default-worker-0000000000"


def test_k8s_pods_are_hardened_like_the_charts(daskjob, calibration_job, chart_objects):
    chart_pods = pod_specs(chart_objects)
    chart_container_sc = next(iter(chart_pods.values()))["containers"][0]["securityContext"]
    chart_pod_sc = next(iter(chart_pods.values()))["securityContext"]
    ours = pod_specs([daskjob, calibration_job])
    assert len(ours) == 4
    for where, pod in ours.items():
        assert pod["securityContext"] == chart_pod_sc, where
        assert pod["automountServiceAccountToken"] is False, where
        for c in pod["containers"]:
            assert c["securityContext"] == chart_container_sc, where
            assert c["image"] == "ghcr.io/simcal/simcal:0.1.0", where
            assert c["imagePullPolicy"] == "IfNotPresent", where
