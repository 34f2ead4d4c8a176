"""``simcal submit``: the manifests validate offline and carry the release's driver pod; the API
calls go to a stub standing in for a Kubernetes API server (none can run here): it serves the
release's ``driver-template`` ConfigMap as rendered by the real chart, and records the POSTs.

What the stub cannot show (admission, RBAC, the Job's pod actually starting) is for a real
cluster: ``simcal submit --release <r> --config <file>`` after ``helm install``, then
``kubectl logs -f job/<name>``.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import urllib.parse
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
from simcal.config import load_config
from simcal.submit import job_files

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
    ("release", "namespace", "values"),
    [
        ("demo", "calib", {}),
        ("simcal-prod", "science", {}),
        ("demo", "calib", {"storage": {"existingSecret": "pg"}}),
        ("demo", "calib", {"workers": {"replicas": 3}}),
    ],
)
def test_pod_is_the_charts_driver_pod(capsys, tmp_path, release, namespace, values):
    """Release names, namespace, storage, worker count and grace period as the chart has them."""
    config = {**CONFIG, "grace_period": 45}
    path = write(tmp_path, config)
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values), encoding="utf-8")
    config_map, job = dry_run(
        capsys, "--release", release, "--namespace", namespace, "--config", str(path),
        "--values", str(values_file),
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


def test_bad_config_exits_2_naming_the_field(capsys, tmp_path):
    path = write(tmp_path, {**CONFIG, "replicates": 0})
    assert main(["submit", "--release", "r", "--config", str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "  replicates:" in captured.err


def test_storage_in_a_config_is_replaced_with_a_note(capsys, tmp_path):
    """Configs copied from the examples carry storage:; the release's storage replaces it."""
    path = write(tmp_path, {**CONFIG, "storage": "postgresql://u:hunter2@db/simcal"})
    assert main(["submit", "--release", "r", "--config", str(path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "storage: in the config is replaced by the release's storage" in captured.err
    assert "hunter2" not in captured.out + captured.err
    config_map, _ = yaml.safe_load_all(captured.out)
    assert yaml.safe_load(config_map["data"]["calibration.yaml"]) == CONFIG


# --- against a stub of the Kubernetes API server ---------------------------------------


class StubAPI(ThreadingHTTPServer):
    """Records every request; answers POSTs with 201 and the object (a generated name filled
    in), or with ``refuse[path] = (status, reason)`` as a Kubernetes Status."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.refuse: dict[str, tuple[int, str]] = {}
        self.config_maps: list[dict[str, Any]] = []  # served to GET .../configmaps

    def install(self, release: str, namespace: str, values: dict[str, Any]) -> None:
        """What ``helm install`` would leave: the ConfigMaps of the real chart's render."""
        objects = render(values, name=release, namespace=namespace)
        self.config_maps += [o for o in objects if o["kind"] == "ConfigMap"]

    def posts(self) -> list[tuple[str, dict[str, Any]]]:
        return [(path, body) for method, path, body in self.requests if method == "POST"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: StubAPI

    def do_GET(self) -> None:
        """A ConfigMap list filtered by ``labelSelector`` (``k=v,...`` only)."""
        url = urllib.parse.urlsplit(self.path)
        self.server.requests.append(("GET", url.path, {}))
        query = urllib.parse.parse_qs(url.query)
        wanted = dict(
            item.split("=", 1) for item in query.get("labelSelector", [""])[0].split(",") if item
        )
        namespace = url.path.split("/")[4]
        items = [
            m for m in self.server.config_maps
            if m["metadata"]["namespace"] == namespace
            and wanted.items() <= m["metadata"].get("labels", {}).items()
        ]
        self._answer(200, {"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {},
                           "items": items})

    def _answer(self, status: int, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

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


@pytest.fixture
def installed(api: StubAPI) -> StubAPI:
    """Release demo in calib, installed with the chart's defaults."""
    api.install("demo", "calib", {})
    return api


def test_creates_the_config_map_then_the_job(installed, capsys, tmp_path):
    api = installed
    expected = dry_run(
        capsys, "--release", "demo", "--namespace", "calib",
        "--config", str(write(tmp_path, CONFIG)),
    )
    assert submit(tmp_path) == 0
    assert [path for path, _ in api.posts()] == [CONFIG_MAPS, JOBS]
    assert [body for _, body in api.posts()] == expected
    out = capsys.readouterr().out
    assert "job.batch/demo-calibration-x7k2p created in namespace calib" in out
    assert "kubectl logs -n calib -f job/demo-calibration-x7k2p" in out


def test_reuses_an_existing_config_map(installed, capsys, tmp_path):
    api = installed
    api.refuse[CONFIG_MAPS] = (409, "AlreadyExists")
    assert submit(tmp_path) == 0
    assert [path for path, _ in api.posts()] == [CONFIG_MAPS, JOBS]
    assert "exists (same content): reused" in capsys.readouterr().out


def test_a_refused_job_exits_1_with_the_api_message(installed, capsys, tmp_path):
    api = installed
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


# --- the release's own settings ------------------------------------------------------------

RELEASE_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/epi/simcal-mysir", "tag": "1.4.2"},
    "imagePullSecrets": [{"name": "regcred"}],
    "tls": {"enabled": True, "existingSecret": "demo-dask-tls"},
    "workers": {"replicas": 5},
    "storage": {"existingSecret": "demo-pg"},
    "driver": {
        "resources": {"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"memory": "6Gi"}},
        "nodeSelector": {"pool": "calibration"},
        "extraVolumes": [{"name": "input", "persistentVolumeClaim": {"claimName": "epi-data"}}],
        "extraVolumeMounts": [{"name": "input", "mountPath": "/input", "readOnly": True}],
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "calibration",
                         "effect": "NoSchedule"}],
    },
}


@pytest.mark.parametrize("version", kube_versions())
def test_submitted_job_carries_the_releases_settings(api, capsys, tmp_path, version):
    """A release with TLS, a private image, pull secrets, resources, PostgreSQL, scheduling and
    5 workers: the Job submitted against it has every one of them, and validates strictly."""
    api.install("demo", "calib", RELEASE_VALUES)
    assert submit(tmp_path) == 0, capsys.readouterr().err
    (_, config_map), (_, job) = api.posts()
    validate_builtin(config_map, version)
    validate_builtin(job, version)
    pod = job["spec"]["template"]["spec"]
    (driver,) = pod["containers"]
    args = driver["args"]
    assert driver["image"] == "registry.example.com/epi/simcal-mysir:1.4.2"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert driver["resources"] == {
        "requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"memory": "6Gi"}
    }
    assert args[args.index("--scheduler") + 1].startswith("tls://demo-simcal-scheduler.calib.")
    assert "--tls-ca-file" in args and "--storage" not in args
    assert args[args.index("--min-workers") + 1] == "5"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dask-tls"]["secret"]["secretName"] == "demo-dask-tls"
    assert "data" not in volumes  # PostgreSQL, not the PVC
    assert {"name": "dask-tls", "mountPath": "/etc/simcal/tls", "readOnly": True} in driver[
        "volumeMounts"
    ]
    env = {e["name"]: e for e in driver["env"]}
    assert env["SIMCAL_STORAGE"]["valueFrom"]["secretKeyRef"]["name"] == "demo-pg"
    assert pod["nodeSelector"] == {"pool": "calibration"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert volumes["input"]["persistentVolumeClaim"]["claimName"] == "epi-data"
    assert {"name": "input", "mountPath": "/input", "readOnly": True} in driver["volumeMounts"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]


def test_a_release_that_does_not_exist_exits_2(api, capsys, tmp_path):
    assert submit(tmp_path) == 2
    err = capsys.readouterr().err
    assert "no simcal release 'demo' in namespace 'calib'" in err
    assert not api.posts()


def test_a_release_of_an_older_chart_names_the_upgrade(api, capsys, tmp_path):
    api.install("demo", "calib", {})
    api.config_maps = [
        m for m in api.config_maps
        if m["metadata"]["labels"]["app.kubernetes.io/component"] != "driver-template"
    ]
    assert submit(tmp_path) == 2
    err = capsys.readouterr().err
    assert "installed with an older simcal chart" in err and "helm upgrade demo" in err
    assert not api.posts()


# --- the model and data travel in the ConfigMap ---------------------------------------------

MYSIR = """import numpy as np


def simulate(params, seed):
    return {"incidence": params["x"] * np.arange(5.0)}
"""


def _user_project(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delitem(sys.modules, "mysir", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_config appends the config's folder
    (folder / "data").mkdir(parents=True)
    (folder / "mysir.py").write_text(MYSIR, encoding="utf-8")
    (folder / "data" / "incidence.csv").write_text("incidence\n0\n1\n2\n3\n4\n")
    return write(folder, {
        **CONFIG,
        "model": "mysir:simulate",
        "targets": [{"name": "incidence", "observed": "data/incidence.csv"}],
    })


def test_the_model_source_and_data_travel_in_the_config_map(capsys, tmp_path, monkeypatch):
    config = _user_project(tmp_path / "proj", monkeypatch)
    config_map, job = dry_run(capsys, "--release", "demo", "--config", str(config))
    assert sorted(config_map["data"]) == ["calibration.yaml", "data__incidence.csv", "mysir.py"]
    assert config_map["data"]["mysir.py"] == MYSIR
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert {"key": "data__incidence.csv", "path": "data/incidence.csv"} in volumes["config"][
        "configMap"
    ]["items"]
    validate_builtin(config_map, kube_versions()[-1])


def test_data_outside_the_config_folder_exits_2(capsys, tmp_path, monkeypatch):
    config = _user_project(tmp_path / "proj", monkeypatch)
    (tmp_path / "elsewhere.csv").write_text("incidence\n0\n1\n2\n3\n4\n")
    text = config.read_text().replace("data/incidence.csv", "../elsewhere.csv")
    config.write_text(text)
    assert main(["submit", "--release", "r", "--config", str(config), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "targets.0.observed: data file" in captured.err and "outside" in captured.err
    assert captured.out == ""


def test_a_package_too_large_for_a_config_map_exits_2(capsys, tmp_path, monkeypatch):
    config = _user_project(tmp_path / "proj", monkeypatch)
    rows = "\n".join(str(i % 5) for i in range(500_000))
    (tmp_path / "proj" / "data" / "incidence.csv").write_text(f"incidence\n{rows}\n")
    assert main(["submit", "--release", "r", "--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "more than a ConfigMap holds" in err and "examples/Dockerfile" in err


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "own-model"


def test_the_own_model_example_ships_its_package_at_its_import_root(monkeypatch):
    """examples/own-model as is: with the project folder on sys.path (the example's header
    comment: PYTHONPATH=examples/own-model/mysir), the package mysir/mysir/ travels as
    ``mysir/__init__.py``, which imports as ``mysir`` in the pod (the config's folder is on its
    sys.path), not as ``mysir/mysir/``, a namespace package there without ``simulate``."""
    monkeypatch.delitem(sys.modules, "mysir", raising=False)
    monkeypatch.setattr(sys, "path", [str(EXAMPLE / "mysir"), *sys.path])
    config = EXAMPLE / "calibration.yaml"
    files, _ = job_files(config, load_config(config))
    assert sorted(files) == ["calibration.yaml", "incidence.csv", "mysir/__init__.py"]
    assert files["mysir/__init__.py"] == (EXAMPLE / "mysir" / "mysir" / "__init__.py").read_bytes()


def test_a_module_and_a_data_file_on_one_path_exit_2(capsys, tmp_path, monkeypatch):
    """A module is carried at its path below its import root, a data file at its path below the
    config's folder: when both land on one path, submit refuses, naming both."""
    config = _user_project(tmp_path / "proj", monkeypatch)
    package = tmp_path / "proj" / "code" / "data"  # a package data, imported from proj/code
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(MYSIR, encoding="utf-8")
    (package / "incidence.csv").write_text("incidence\n9\n")
    monkeypatch.delitem(sys.modules, "data", raising=False)
    monkeypatch.setattr(sys, "path", [str(package.parent), *sys.path])
    config.write_text(config.read_text().replace("mysir:simulate", "data:simulate"))
    assert main(["submit", "--release", "r", "--config", str(config), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "would be carried as 'data/incidence.csv'" in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize("values", ["values.yaml", "values-volume.yaml"])
def test_the_own_model_example_values_render_valid_manifests(values):
    """examples/own-model: the image values, and the data-on-a-volume alternative, whose
    driver Job mounts the existing PVC where the calibration reads its observed data."""
    objects = render(yaml.safe_load((EXAMPLE / values).read_text(encoding="utf-8")))
    for obj in objects:
        if obj["kind"] in ("Job", "ConfigMap", "Pod"):
            validate_builtin(obj, kube_versions()[-1])
    template = find(objects, "ConfigMap", "simcal-driver-template")
    pod = yaml.safe_load(template["data"]["pod-template.yaml"])["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/epi/simcal-mysir:1.0.0"
    if values == "values-volume.yaml":
        job = find(objects, "Job")
        assert job["spec"]["template"]["spec"] == pod
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["input"]["persistentVolumeClaim"]["claimName"] == "epi-data"
        calibration = yaml.safe_load(find(objects, "ConfigMap", "simcal-calibration")["data"][
            "calibration.yaml"
        ])
        assert calibration["targets"][0]["observed"] == "/input/incidence.csv"
        assert calibration["model"] == "mysir:simulate"


@pytest.mark.parametrize("version", kube_versions())
def test_results_job_reads_the_releases_storage(capsys, tmp_path, version):
    """``--results STUDY``: the release's driver pod running ``simcal results`` on its storage
    (PostgreSQL here: the URL from the release's Secret, no --storage, no PVC)."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"storage": {"existingSecret": "demo-pg"}}))
    (job,) = dry_run(capsys, "--release", "demo", "--results", "mysir", "--format", "json",
                     "--values", str(values))
    validate_builtin(job, version)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["simcal", "results", "--study", "mysir", "--format", "json"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SIMCAL_STORAGE"]["valueFrom"]["secretKeyRef"]["name"] == "demo-pg"
    assert job["metadata"]["generateName"] == "demo-results-"


def test_config_and_results_go_alone(capsys, tmp_path):
    path = write(tmp_path, CONFIG)
    args = ["submit", "--release", "r", "--dry-run"]
    assert main([*args, "--config", str(path), "--results", "s"]) == 2
    assert main(args) == 2
    assert "either --config FILE" in capsys.readouterr().err
