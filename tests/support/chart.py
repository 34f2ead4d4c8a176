"""Render the simcal Helm chart offline with the real Helm v4 engine (helm_python).

``helm_python.Chart.render`` (helm-python-sdk 0.2.2) takes no API versions, but the
``helm_render`` entry point of the libhelm_c it bundles accepts ``api_versions`` and
``kube_version`` in its options JSON -- the ``--api-versions`` / ``--kube-version`` of
``helm template``. Its options decoder rejects unknown keys, so if a later release dropped
them, rendering would fail loudly instead of silently ignoring the capabilities.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import helm_python
import yaml
from helm_python import _native

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "simcal"
K8S_DIR = REPO_ROOT / "k8s"
RULES_FILE = CHART_DIR / "files" / "prometheus-rules.yaml"
DASHBOARD_FILE = CHART_DIR / "files" / "grafana-dashboard.json"

RELEASE = "simcal"
NAMESPACE = "default"

#: What a cluster with the Dask operator installed serves (helm --api-versions).
DASK_APIS: tuple[str, ...] = (
    "kubernetes.dask.org/v1",
    "kubernetes.dask.org/v1/DaskCluster",
    "kubernetes.dask.org/v1/DaskWorkerGroup",
    "kubernetes.dask.org/v1/DaskJob",
    "kubernetes.dask.org/v1/DaskAutoscaler",
)
#: ... and the Prometheus Operator.
MONITORING_APIS: tuple[str, ...] = (
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)
ALL_APIS: tuple[str, ...] = DASK_APIS + MONITORING_APIS


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, ``override`` wins (like ``helm --set`` over values.yaml)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@functools.cache
def _chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART_DIR)


def render_raw(
    values: Mapping[str, Any] | None = None,
    *,
    api_versions: Iterable[str] = ALL_APIS,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
    revision: int = 1,
    kube_version: str | None = None,
) -> dict[str, str]:
    """Render every template: ``{template path: manifest text}``.

    Raises ``helm_python.HelmValuesError`` (schema) or ``HelmRenderError`` (``fail``).
    """
    merged = dict(values or {})
    opts: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "revision": revision,
        "api_versions": list(api_versions),
    }
    if kube_version:
        opts["kube_version"] = kube_version
    rendered = _native.call_string(
        "helm_render", _chart()._raw(), json.dumps(merged) if merged else None, json.dumps(opts)
    )
    manifests: dict[str, str] = json.loads(rendered)
    return manifests


def parse(manifests: Mapping[str, str], *, include_tests: bool = True) -> list[dict[str, Any]]:
    """All Kubernetes objects of a render (NOTES.txt and empty documents skipped)."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        if not include_tests and "/templates/tests/" in path:
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert isinstance(doc, dict), f"{path}: a document is not a mapping"
                objects.append(doc)
    return objects


def render(values: Mapping[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Render and parse: the list of objects Helm would apply (test hooks included)."""
    return parse(render_raw(values, **kwargs))


def notes(values: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
    manifests = render_raw(values, **kwargs)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def find_all(objects: Iterable[Mapping[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [dict(o) for o in objects if o.get("kind") == kind]


def find(
    objects: Iterable[Mapping[str, Any]], kind: str, name: str | None = None
) -> dict[str, Any]:
    """The one object of ``kind`` (and ``name``, if given); fails if there is not exactly one."""
    matches = [
        o for o in find_all(objects, kind) if name is None or o["metadata"].get("name") == name
    ]
    assert len(matches) == 1, (
        f"expected one {kind} {name or ''}, found {[m['metadata'].get('name') for m in matches]}"
    )
    return matches[0]


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def default_values() -> dict[str, Any]:
    """The chart's values.yaml, parsed."""
    values: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text("utf-8"))
    return values


def container(pod_spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(matches) == 1, f"no single container {name!r}"
    return dict(matches[0])


def env_map(container_spec: Mapping[str, Any]) -> dict[str, Any]:
    """Container env as {name: value or valueFrom}."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container_spec.get("env", [])}


def pod_specs(objects: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec of a render, by a descriptive key."""
    specs: dict[str, dict[str, Any]] = {}
    for obj in objects:
        kind = obj["kind"]
        name = obj["metadata"].get("name") or obj["metadata"]["generateName"]
        if kind == "DaskCluster":
            specs[f"{name}/scheduler"] = obj["spec"]["scheduler"]["spec"]
            specs[f"{name}/worker"] = obj["spec"]["worker"]["spec"]
        elif kind == "Job":
            specs[f"job/{name}"] = obj["spec"]["template"]["spec"]
        elif kind == "Pod":
            specs[f"pod/{name}"] = obj["spec"]
        elif kind == "DaskJob":
            specs[f"{name}/job"] = obj["spec"]["job"]["spec"]
            specs[f"{name}/scheduler"] = obj["spec"]["cluster"]["spec"]["scheduler"]["spec"]
            specs[f"{name}/worker"] = obj["spec"]["cluster"]["spec"]["worker"]["spec"]
    return specs


def expand_k8s_vars(arg: str, env: Mapping[str, Any]) -> str:
    """Kubernetes ``$(VAR)`` expansion of a container arg against its (string) env."""
    out = arg
    for key, value in env.items():
        if isinstance(value, str):
            out = out.replace(f"$({key})", value)
    return out


def local_mounts(
    name: str,
    pod: Mapping[str, Any],
    root: Path,
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, bytes]] | None = None,
) -> dict[str, str]:
    """Each volume mount of the pod's one container as a directory under ``root``, filled
    from its ConfigMap or Secret as the kubelet would: mount path -> local directory."""
    (container_spec,) = pod["containers"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts: dict[str, str] = {}
    for mount in container_spec.get("volumeMounts", []):
        local = root / name / mount["name"]
        local.mkdir(parents=True, exist_ok=True)  # a pod of the same name again: same volume
        volume = volumes[mount["name"]]
        if "secret" in volume:
            data = (secrets or {})[volume["secret"]["secretName"]]
            for item in volume["secret"]["items"]:
                (local / item["path"]).write_bytes(data[item["key"]])
        elif "configMap" in volume:
            data = config_maps[volume["configMap"]["name"]]
            items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:  # each key at its path, folders made as the kubelet does
                (local / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                (local / item["path"]).write_text(data[item["key"]], encoding="utf-8")
        mounts[mount["mountPath"]] = str(local)
    return mounts


def mount_rewriter(mounts: Mapping[str, str]) -> Callable[[str], str]:
    """Replaces in-pod mount paths in a text by their local directories (longest first, so
    /etc/simcal/tls is not read as /etc/simcal)."""
    if not mounts:
        return lambda text: text
    longest_first = sorted(mounts, key=len, reverse=True)
    paths = re.compile(rf"(?<![\w.-])({'|'.join(map(re.escape, longest_first))})(?=/|$)")
    return lambda text: paths.sub(lambda m: mounts[m.group(1)], text)
