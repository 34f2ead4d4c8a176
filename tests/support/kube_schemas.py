"""Offline validation of Kubernetes objects, as strict as an API server would be.

- Built-in kinds: ``kubernetes_validate`` (strict schemas: unknown fields are errors) for
  every Kubernetes version it ships from 1.29 on.
- Dask operator kinds: the CRDs shipped inside the dask-kubernetes package. Their
  ``openAPIV3Schema`` is checked with jsonschema, and a second walk flags fields the schema
  does not declare: the API server prunes those silently (no error, the field is just gone).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dask_kubernetes
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import all_versions
from packaging.version import Version

MIN_KUBE = Version("1.29")
DASK_GROUP = "kubernetes.dask.org"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: Kinds no built-in schema knows: checked by other means (CRDs, structural checks).
CUSTOM_GROUPS = (DASK_GROUP, "monitoring.coreos.com")


def kube_versions() -> list[str]:
    """Every Kubernetes minor version kubernetes-validate ships, from 1.29 to the newest."""
    minors = sorted({Version(v).release[:2] for v in all_versions()})
    versions = [
        f"{major}.{minor}" for major, minor in minors if Version(f"{major}.{minor}") >= MIN_KUBE
    ]
    assert versions, "kubernetes-validate ships no schema >= 1.29"
    return versions


def is_custom(obj: Mapping[str, Any]) -> bool:
    return str(obj.get("apiVersion", "")).split("/")[0] in CUSTOM_GROUPS


def validate_builtin(obj: Mapping[str, Any], version: str) -> None:
    """Strict kubernetes-validate; raises AssertionError naming the object, field and version."""
    try:
        validated = kubernetes_validate.validate(dict(obj), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        raise AssertionError(
            f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')}"
            f" invalid for Kubernetes {exc.version}: {path}: {exc.message}"
        ) from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise AssertionError(exc.message) from None
    # kubernetes-validate falls back to the nearest older schema: make sure it did not.
    assert validated == version, f"asked for {version}, validated against {validated}"


# --- Dask operator CRDs ---------------------------------------------------------------


def crd_dir() -> Path:
    """The generated CRDs (with the full pod spec schema) inside the dask-kubernetes package."""
    root = Path(dask_kubernetes.__file__).parent
    candidates = sorted(root.glob("**/crds/daskcluster.yaml"))
    assert candidates, f"no CRD files under {root}"
    return candidates[0].parent


@functools.cache
def _load_crd(path: Path) -> dict[str, Any]:
    # The C loader when available: these files are up to ~0.5 MB of YAML.
    crd: dict[str, Any] = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)
    assert crd.get("kind") == "CustomResourceDefinition", path
    return crd


def crd_schema(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The served ``openAPIV3Schema`` of the CRD for ``obj`` (e.g. crds/daskcluster.yaml)."""
    group, version = str(obj["apiVersion"]).split("/")
    path = crd_dir() / f"{str(obj['kind']).lower()}.yaml"
    assert path.is_file(), f"no CRD file for {obj['kind']} in {crd_dir()}"
    crd = _load_crd(path)
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, obj["kind"]), path
    for served in crd["spec"]["versions"]:
        if served["name"] == version and served.get("served", True):
            schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"{path.name} serves no version {version}")


#: Fields every object has although a CRD's schema does not list them.
_ROOT_FIELDS = {"apiVersion", "kind", "metadata"}


def unknown_fields(obj: Any, schema: Mapping[str, Any], path: str = "") -> Iterator[str]:
    """Paths in ``obj`` that ``schema`` does not declare, i.e. that the API server prunes."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(obj, Mapping):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            here = f"{path}.{key}" if path else key
            if path == "" and key in _ROOT_FIELDS:
                continue
            if props is not None and key in props:
                yield from unknown_fields(value, props[key], here)
            elif isinstance(extra, Mapping):
                yield from unknown_fields(value, extra, here)
            elif extra is True:
                continue
            else:
                yield here
    elif isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(obj):
            yield from unknown_fields(item, schema["items"], f"{path}[{index}]")


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def validate_custom_resource(obj: Mapping[str, Any]) -> None:
    """Validate a Dask operator object against its CRD: types, required fields, no pruning."""
    schema = crd_schema(obj)
    validator = jsonschema.Draft4Validator(schema)
    errors = sorted(validator.iter_errors(dict(obj)), key=lambda e: list(e.absolute_path))
    name = obj.get("metadata", {}).get("name")
    assert not errors, f"{obj['kind']}/{name} does not match its CRD:\n" + "\n".join(
        f"  {'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors
    )
    dropped = list(unknown_fields(obj, schema))
    assert not dropped, (
        f"{obj['kind']}/{name}: fields the CRD does not declare (the API server would drop "
        f"them silently): {dropped}"
    )
    assert isinstance(name, str) and _DNS_SUBDOMAIN.match(name) and len(name) <= 253, name
    for key in ("labels", "annotations"):
        for label, value in (obj["metadata"].get(key) or {}).items():
            assert isinstance(value, str), f"metadata.{key}.{label} must be a string"
