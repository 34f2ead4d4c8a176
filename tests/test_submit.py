"""``simcal submit``: the manifests validate offline and carry the chart's driver pod; the API
calls go to a stub standing in for a Kubernetes API server (none can run here).

What the stub cannot show (admission, RBAC, the Job's pod actually starting) is for a real
cluster: ``simcal submit --release <r> --config <file>`` after ``helm install``, then
``kubectl logs -f job/<name>``.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart import K8S_DIR, find, load_yaml_docs, render
from conftest import run_simcal
from kube_schemas import kube_versions, validate_builtin
from simcal.cli import main

CONFIG = {
    "study": "submitted",
    "model": "simcal.models.synthetic:simulate",
    "parameters": {"x": {"low": 0.0, "high": 1.0}, "y": {"low": 0.0, "high": 1.0}},
    "targets": [{"name": "y", "observed": "simcal.models.synthetic:observed"}],
    "max_trials": 10,
}


def write(directory: Path, config: dict[str, Any]) -> Path:
    path = directory / "calibration.yaml"
    path.write_text("# submitted by a test\n" + yaml.safe_dump(config), encoding="utf-8")
    return path


def dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    assert main(["submit", "--dry-run", *args]) == 0
    return list(yaml.safe_load_all(capsys.readouterr().out))


def pod_of(job: dict[str, Any], config_map: str) -> dict[str, Any]:
    """The Job's pod spec with the config volume pointing at ``config_map``."""
    pod = copy.deepcopy(job["spec"]["template"]["spec"])
    for volume in pod["volumes"]:
        if volume["name"] == "config":
            volume["configMap"]["name"] = config_map
    return pod


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """``simcal submit --dry-run`` for release simcal in default, as a process."""
    config = write(tmp_path_factory.mktemp("submit"), CONFIG)
    result = run_simcal("submit", "--release", "simcal", "--config", str(config), "--dry-run")
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


@pytest.mark.parametrize("version", kube_versions())
def test_dry_run_validates_strictly(manifests, version):
    assert [m["kind"] for m in manifests] == ["ConfigMap", "Job"]
    for manifest in manifests:
        validate_builtin(manifest, version)


def test_dry_run_is_k8s_calibration_job_with_its_own_config(manifests, tmp_path):
    config_map, job = manifests
    (reference,) = load_yaml_docs(K8S_DIR / "calibration-job.yaml")
    assert job["metadata"] == reference["metadata"]  # generateName simcal-calibration-
    for key in ("backoffLimit", "ttlSecondsAfterFinished", "podFailurePolicy"):
        assert job["spec"][key] == reference["spec"][key], key
    assert job["spec"]["template"]["metadata"] == reference["spec"]["template"]["metadata"]
    name = config_map["metadata"]["name"]
    assert name.startswith("simcal-calibration-") and name != "simcal-calibration"
    assert pod_of(reference, name) == job["spec"]["template"]["spec"]
    text = config_map["data"]["calibration.yaml"]
    assert text.startswith("# submitted by a test\n") and yaml.safe_load(text) == CONFIG


@pytest.mark.parametrize(
    ("release", "namespace", "args", "values"),
    [
        ("demo", "calib", [], {}),
        ("simcal-prod", "science", [], {}),
        ("demo", "calib", ["--storage-secret", "pg"], {"storage": {"existingSecret": "pg"}}),
        ("demo", "calib", ["--min-workers", "3"], {"workers": {"replicas": 3}}),
    ],
)
def test_pod_is_the_charts_driver_pod(capsys, tmp_path, release, namespace, args, values):
    """Release names, namespace, storage, worker count and grace period as the chart has them."""
    config = {**CONFIG, "grace_period": 45}
    path = write(tmp_path, config)
    config_map, job = dry_run(
        capsys, "--release", release, "--namespace", namespace, "--config", str(path), *args
    )
    chart = render({"calibration": config, **values}, name=release, namespace=namespace)
    chart_job = find(chart, "Job")
    chart_pod = chart_job["spec"]["template"]["spec"]
    (chart_config_map,) = [v["configMap"]["name"] for v in chart_pod["volumes"] if "configMap" in v]
    assert pod_of(job, chart_config_map) == chart_pod
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 75
    assert config_map["metadata"]["namespace"] == job["metadata"]["namespace"] == namespace
    assert job["metadata"]["generateName"] == f"{release}-calibration-"


def test_config_map_is_named_by_content(capsys, tmp_path):
    first = dry_run(capsys, "--release", "r", "--config", str(write(tmp_path, CONFIG)))
    again = dry_run(capsys, "--release", "r", "--config", str(write(tmp_path, CONFIG)))
    other = dry_run(
        capsys, "--release", "r", "--config", str(write(tmp_path, {**CONFIG, "max_trials": 11}))
    )
    assert first[0]["metadata"]["name"] == again[0]["metadata"]["name"]
    assert first[0]["metadata"]["name"] != other[0]["metadata"]["name"]


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({**CONFIG, "replicates": 0}, "replicates"),
        ({**CONFIG, "storage": "postgresql://u:hunter2@db/simcal"}, "storage"),
    ],
)
def test_bad_config_exits_2_naming_the_field(capsys, tmp_path, config, field):
    path = write(tmp_path, config)
    assert main(["submit", "--release", "r", "--config", str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"  {field}:" in captured.err and "hunter2" not in captured.err


# --- against a stub of the Kubernetes API server ---------------------------------------


class StubAPI(ThreadingHTTPServer):
    """Records every request; answers POSTs with 201 and the object (a generated name filled
    in), or with ``refuse[path] = (status, reason)`` as a Kubernetes Status."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.refuse: dict[str, tuple[int, str]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: StubAPI

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(("POST", self.path, body))
        if self.path in self.server.refuse:
            status, reason = self.server.refuse[self.path]
            answer = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "message": f"stub says {reason}", "reason": reason, "code": status}
        else:
            status, answer = 201, copy.deepcopy(body)
            meta = answer["metadata"]
            meta.setdefault("name", meta.get("generateName", "") + "x7k2p")
            meta["uid"] = "00000000-0000-0000-0000-000000000001"
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def api(tmp_path, monkeypatch) -> Iterator[StubAPI]:
    """The stub API server, and a kubeconfig pointing at it in $KUBECONFIG."""
    server = StubAPI()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stub", "cluster": {"server": server.url}}],
        "users": [{"name": "stub", "user": {"token": "test-token"}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}],
        "current-context": "stub",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig), encoding="utf-8")
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield server
    server.shutdown()
    server.server_close()


CONFIG_MAPS = "/api/v1/namespaces/calib/configmaps"
JOBS = "/apis/batch/v1/namespaces/calib/jobs"


def submit(tmp_path: Path) -> int:
    path = write(tmp_path, CONFIG)
    return main(["submit", "--release", "demo", "--namespace", "calib", "--config", str(path)])


def test_creates_the_config_map_then_the_job(api, capsys, tmp_path):
    expected = dry_run(
        capsys, "--release", "demo", "--namespace", "calib",
        "--config", str(write(tmp_path, CONFIG)),
    )
    assert submit(tmp_path) == 0
    assert [(method, path) for method, path, _ in api.requests] == [
        ("POST", CONFIG_MAPS), ("POST", JOBS)
    ]
    assert [body for _, _, body in api.requests] == expected
    out = capsys.readouterr().out
    assert "job.batch/demo-calibration-x7k2p created in namespace calib" in out
    assert "kubectl logs -n calib -f job/demo-calibration-x7k2p" in out


def test_reuses_an_existing_config_map(api, capsys, tmp_path):
    api.refuse[CONFIG_MAPS] = (409, "AlreadyExists")
    assert submit(tmp_path) == 0
    assert [path for _, path, _ in api.requests] == [CONFIG_MAPS, JOBS]
    assert "exists (same content): reused" in capsys.readouterr().out


def test_a_refused_job_exits_1_with_the_api_message(api, capsys, tmp_path):
    api.refuse[JOBS] = (403, "Forbidden")
    assert submit(tmp_path) == 1
    err = capsys.readouterr().err
    assert "the Kubernetes API refused: 403" in err and "stub says Forbidden" in err


def test_an_unreachable_api_exits_1(api, capsys, tmp_path):
    api.shutdown()
    api.server_close()
    assert submit(tmp_path) == 1
    assert "cannot reach the Kubernetes API" in capsys.readouterr().err


def test_without_the_kubernetes_client_it_says_what_to_install(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    assert submit(tmp_path) == 1
    assert "pip install 'simcal[kubernetes]'" in capsys.readouterr().err
