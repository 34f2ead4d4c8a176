"""Scenario 9 (static security): checkov finds no failed check in the Helm chart or the
Dockerfile, and every check it is told to skip carries a reason in the repository.

checkov's own Helm runner needs a ``helm`` binary, which this project does not install;
the chart is rendered with the real Helm engine instead (``tests/support/chart.py``, as ``helm
template`` would), in several value sets, into plain manifests that checkov's Kubernetes
runner scans. The Dask operator turns each DaskCluster into a scheduler Deployment, a
scheduler Service and worker Deployments; checkov does not know that CRD, so those objects
are written out too, with the pod specs and labels the operator gives them, so the pods
that do the work are scanned as well.

checkov runs from its own virtualenv (``make test`` builds ``.venv-checkov``); the test is
skipped only outside CI when it is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart import REPO_ROOT, parse, render_raw
from conftest import require

CONFIG = REPO_ROOT / ".checkov.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
NAMESPACE = "simcal"  # the chart installs into the release namespace; not "default"

#: Value sets rendered and scanned: the defaults and the optional parts switched on.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "postgres-secret-autoscaler": {
        "storage": {"existingSecret": "simcal-db"},
        "autoscaler": {"enabled": True, "minimum": 2, "maximum": 16},
    },
    "tls": {"tls": {"enabled": True, "existingSecret": "simcal-tls"}},
    "monitoring-off": {"monitoring": {"enabled": False}},
}


def checkov_command() -> list[str] | None:
    """``$CHECKOV``, else the project's ``.venv-checkov``, else ``checkov`` on PATH."""
    for candidate in (
        os.environ.get("CHECKOV"),
        str(REPO_ROOT / ".venv-checkov" / "bin" / "checkov"),
        shutil.which("checkov"),
    ):
        if candidate and Path(candidate).is_file():
            return [candidate]
    return None


@pytest.fixture(scope="module")
def checkov() -> list[str]:
    command = checkov_command()
    require(command, "checkov is not installed: `make test` builds .venv-checkov")
    return command


def operator_objects(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """What the Dask operator creates for a DaskCluster: scheduler Deployment and Service,
    and a worker Deployment (the pod specs and labels as given, plus the operator's)."""
    name = cluster["metadata"]["name"]
    namespace = cluster["metadata"]["namespace"]
    labels = dict(cluster["metadata"].get("labels", {}))
    objects: list[dict[str, Any]] = []
    for component, deployment in (("scheduler", f"{name}-scheduler"), ("worker", f"{name}-worker")):
        spec = cluster["spec"][component]
        pod_labels = {
            **labels,
            **spec.get("metadata", {}).get("labels", {}),
            "dask.org/cluster-name": name,
            "dask.org/component": component,
        }
        if component == "worker":
            pod_labels["dask.org/workergroup-name"] = "default"
        template_meta = {"labels": pod_labels}
        if spec.get("metadata", {}).get("annotations"):
            template_meta["annotations"] = spec["metadata"]["annotations"]
        objects.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": deployment, "namespace": namespace, "labels": pod_labels},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": pod_labels},
                    "template": {"metadata": template_meta, "spec": spec["spec"]},
                },
            }
        )
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"{name}-scheduler", "namespace": namespace, "labels": labels},
            "spec": cluster["spec"]["scheduler"]["service"],
        }
    )
    return objects


def render_manifests(directory: Path) -> list[str]:
    """Render every value set into ``directory/<set>/``; returns the sets written."""
    written = []
    for name, values in VALUE_SETS.items():
        objects = parse(render_raw(values, namespace=NAMESPACE))
        for cluster in [o for o in objects if o["kind"] == "DaskCluster"]:
            objects += operator_objects(cluster)
        target = directory / name
        target.mkdir(parents=True)
        for index, obj in enumerate(objects):
            path = target / f"{index:03d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
            path.write_text(yaml.safe_dump(obj, sort_keys=False), "utf-8")
        written.append(name)
    return written


def run_checkov(command: list[str], *args: str) -> dict[str, Any]:
    """checkov with the repository's config, offline, JSON out; one report per framework."""
    result = subprocess.run(
        [*command, "--config-file", str(CONFIG), "--output", "json", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": ""},
        check=False,
    )
    assert result.stdout.strip(), f"checkov printed nothing:\n{result.stderr[-4000:]}"
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    return {r["check_type"]: r for r in reports if isinstance(r, dict) and "check_type" in r}


def _failures(report: dict[str, Any]) -> list[str]:
    return [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
        for c in report["results"]["failed_checks"]
    ]


def test_config_skips_carry_a_reason() -> None:
    """Each ``skip-check`` entry of .checkov.yaml has a one-line reason in a comment."""
    lines = CONFIG.read_text("utf-8").splitlines()
    entries = [line for line in lines if re.match(r"^\s*-\s*CKV", line)]
    assert entries, "no skip-check entries"
    for line in entries:
        check, _, reason = line.partition("#")
        assert re.fullmatch(r"\s*-\s*CKV2?_[A-Z0-9]+_\d+\s*", check), line
        assert len(reason.strip()) >= 20, f"no reason given: {line!r}"
    skipped = yaml.safe_load(CONFIG.read_text("utf-8"))["skip-check"]
    assert len(skipped) == len(entries) == len(set(skipped))


def test_helm_chart_has_no_failed_checks(checkov: list[str], tmp_path: Path) -> None:
    assert render_manifests(tmp_path) == list(VALUE_SETS)
    reports = run_checkov(checkov, "--framework", "kubernetes", "-d", str(tmp_path))
    report = reports["kubernetes"]
    summary = report["summary"]
    assert summary["passed"] > 100, summary
    assert not _failures(report), "\n".join(_failures(report))
    # Inline skips (checkov.io/skip annotations) must say why.
    for check in report["results"]["skipped_checks"]:
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason.strip()) >= 20, (check["check_id"], check["resource"])
    # The operator's pods were scanned too.
    resources = {c["resource"] for c in report["results"]["passed_checks"]}
    assert any(r.startswith("Deployment.") and r.endswith("-worker") for r in resources)


def test_dockerfile_has_no_failed_checks(checkov: list[str]) -> None:
    if not DOCKERFILE.is_file():
        pytest.fail("no Dockerfile at the repository root")
    reports = run_checkov(checkov, "--framework", "dockerfile", "-f", str(DOCKERFILE))
    report = reports["dockerfile"]
    assert report["summary"]["passed"] > 10, report["summary"]
    assert not _failures(report), "\n".join(_failures(report))
