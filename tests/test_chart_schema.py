"""values.schema.json: wrong types and out-of-range values are rejected by Helm itself (the
schema is applied when rendering), with messages that name the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import helm_python
import jsonschema
import pytest

from chart import CHART_DIR, default_values, find, render

SCHEMA_FILE = CHART_DIR / "values.schema.json"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return loaded


def rejection(values: Mapping[str, Any]) -> str:
    """Render with ``values``; return Helm's schema error (fails if Helm accepts them)."""
    with pytest.raises(helm_python.HelmValuesError) as excinfo:
        render(values)
    return str(excinfo.value)


def test_schema_is_a_valid_draft7_schema(schema):
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False


def test_defaults_pass_the_schema(schema):
    jsonschema.Draft7Validator(schema).validate(default_values())
    with helm_python.Chart.load(CHART_DIR) as chart:
        chart.validate_schema({})


def test_rejects_replicas_as_a_word():
    message = rejection({"workers": {"replicas": "eight"}})
    assert "/workers/replicas" in message
    assert "want integer" in message


def test_rejects_a_negative_replica_count():
    message = rejection({"workers": {"replicas": -2}})
    assert "/workers/replicas" in message
    assert "minimum" in message


def test_rejects_an_unknown_top_level_key():
    message = rejection({"wokers": {"replicas": 8}})
    assert "wokers" in message
    assert "additional properties" in message


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"workers": {"threads": 0}}, "/workers/threads"),
        ({"workers": {"minReplicas": 0}}, "/workers/minReplicas"),
        ({"workers": {"replicas": 2.5}}, "/workers/replicas"),
        (
            {"workers": {"resources": {"limits": {"memory": "2 GB"}}}},
            "/workers/resources/limits/memory",
        ),
        (
            {"workers": {"resources": {"limits": {"memory": 2048}}}},
            "/workers/resources/limits/memory",
        ),
        (
            {"scheduler": {"resources": {"requests": {"cpu": "one"}}}},
            "/scheduler/resources/requests/cpu",
        ),
        ({"workers": {"replica": 8}}, "/workers"),
        ({"autoscaler": {"maximum": "many"}}, "/autoscaler/maximum"),
        ({"autoscaler": {"enabled": "yes"}}, "/autoscaler/enabled"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"driver": {"restartPolicy": "Always"}}, "/driver/restartPolicy"),
        ({"driver": {"backoffLimit": -1}}, "/driver/backoffLimit"),
        ({"driver": {"parallelism": 0}}, "/driver/parallelism"),
        ({"driver": {"parallelism": -1}}, "/driver/parallelism"),
        ({"driver": {"parallelism": "two"}}, "/driver/parallelism"),
        ({"driver": {"extraArgs": "--max-trials 5"}}, "/driver/extraArgs"),
        ({"monitoring": {"prometheusOperator": "yes"}}, "/monitoring/prometheusOperator"),
        ({"monitoring": {"interval": "30"}}, "/monitoring/interval"),
        ({"storage": {"existingSecretKey": ""}}, "/storage/existingSecretKey"),
        (
            {"storage": {"persistence": {"accessModes": ["ReadOnlyMany"]}}},
            "/storage/persistence/accessModes/0",
        ),
        (
            {"networkPolicy": {"prometheus": {"namespaceSelector": None, "podSelector": None}}},
            "/networkPolicy/prometheus",
        ),
        ({"calibration": {"replicates": 0}}, "/calibration/replicates"),
        ({"calibration": {"sampler": "grid"}}, "/calibration/sampler"),
        ({"calibration": {"model": "not a reference"}}, "/calibration/model"),
        ({"tests": {"timeout": 0}}, "/tests/timeout"),
        ({"fullnameOverride": "Not_A_Name"}, "/fullnameOverride"),
    ],
)
def test_rejects_bad_values_naming_the_field(values, field):
    message = rejection(values)
    assert f"at '{field}'" in message, message


def test_storage_url_cannot_be_written_into_values():
    """The storage URL comes from a Secret (or the PVC): never a literal in values."""
    message = rejection({"calibration": {"storage": "postgresql://user:pw@db/simcal"}})
    assert "/calibration" in message and "storage" in message


@pytest.mark.parametrize(
    "values",
    [
        {"workers": {"resources": {"limits": {"cpu": 2, "memory": "4G"}}}},
        {"workers": {"resources": {"requests": {"cpu": "250m", "memory": "1536Mi"}}}},
        {"workers": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
        {"workers": {"minReplicas": None}},
        {"driver": {"ttlSecondsAfterFinished": None, "extraArgs": ["--max-trials", 500]}},
        {"calibration": {"max_in_flight": "auto", "min_workers": 4, "target_loss": 0.1}},
        {"networkPolicy": {"prometheus": {"namespaceSelector": {}}}},
    ],
)
def test_accepts_valid_variations(values):
    assert find(render(values), "DaskCluster")


def schema_paths(
    node: Mapping[str, Any], schema_root: Mapping[str, Any], prefix: str = ""
) -> Iterator[str]:
    """Every property path the schema declares (following local $refs)."""
    if "$ref" in node:
        target: Any = schema_root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    for key, sub in (node.get("properties") or {}).items():
        path = f"{prefix}.{key}" if prefix else key
        yield path
        yield from schema_paths(sub, schema_root, path)


#: Values that are free-form maps (declared as a whole, documented as a whole).
FREE_FORM = {
    "podSecurityContext",
    "containerSecurityContext",
    "calibration",
    "networkPolicy.prometheus",
    "networkPolicy.operator",
}


def value_paths(
    values: Mapping[str, Any], prefix: str = "", *, leaves_only: bool = False
) -> Iterator[str]:
    """Key paths of a values tree; free-form maps and ``resources`` are not descended."""
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        opaque = path in FREE_FORM or key in ("resources", "readinessProbe", "livenessProbe")
        if opaque or not (isinstance(value, Mapping) and value):
            yield path
        else:
            if not leaves_only:
                yield path
            yield from value_paths(value, path, leaves_only=leaves_only)


def test_every_default_value_is_declared_in_the_schema(schema):
    declared = set(schema_paths(schema, schema))
    undeclared = [p for p in value_paths(default_values()) if p not in declared]
    assert undeclared == []


def test_readme_documents_every_value():
    readme = (CHART_DIR / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    leaves = set(value_paths(default_values(), leaves_only=True))
    assert sorted(leaves - documented) == [], "values missing from helm/simcal/README.md"
    assert sorted(documented - leaves) == [], "README documents values that do not exist"


def test_calibration_schema_matches_simcal_config(schema):
    """The chart's calibration block accepts exactly simcal's config fields, minus storage."""
    config = pytest.importorskip("simcal.config")
    fields = config.CalibrationConfig.model_fields
    calibration = schema["properties"]["calibration"]
    assert set(calibration["properties"]) == set(fields) - {"storage"}
    required = {name for name, f in fields.items() if f.is_required()}
    assert set(calibration["required"]) == required
    assert calibration["additionalProperties"] is False


def test_parallel_drivers_are_an_indexed_job_on_postgresql():
    values = {"driver": {"parallelism": 3}, "storage": {"existingSecret": "simcal-db"}}
    job = find(render(values), "Job")
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 3)
    assert job["spec"]["parallelism"] == 3
    (container,) = job["spec"]["template"]["spec"]["containers"]
    pod_name = next(e for e in container["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    single = find(render({}), "Job")["spec"]
    assert "completionMode" not in single and "parallelism" not in single


def test_parallel_drivers_refuse_a_shared_sqlite_volume():
    with pytest.raises(Exception, match=r"driver\.parallelism > 1 needs PostgreSQL"):
        render({"driver": {"parallelism": 2}})


def test_the_values_table_is_generated_from_values_yaml(tmp_path):
    """helm/simcal/README.md's table is what `make chart-docs` writes; an edit of a `# --`
    comment without regenerating it fails here."""
    import shutil
    import subprocess
    import sys

    script = CHART_DIR.parent.parent / "scripts" / "chart_docs.py"
    values = (CHART_DIR / "values.yaml").read_text(encoding="utf-8")
    assert "## --" not in values, "values.yaml: helm-docs comments are `# --`, not `## --`"

    def check(chart):
        return subprocess.run(
            [sys.executable, str(script), "--check", "--chart", str(chart)],
            capture_output=True, text=True, timeout=60, check=False,
        )

    fresh = check(CHART_DIR)
    assert fresh.returncode == 0, fresh.stderr
    copy = tmp_path / "chart"
    shutil.copytree(CHART_DIR, copy)
    edited = values.replace("# -- Number of Dask workers", "# -- How many Dask workers", 1)
    assert edited != values
    (copy / "values.yaml").write_text(edited, encoding="utf-8")
    stale = check(copy)
    assert stale.returncode == 1 and "stale" in stale.stderr
    subprocess.run([sys.executable, str(script), "--chart", str(copy)], check=True, timeout=60)
    assert "How many Dask workers" in (copy / "README.md").read_text(encoding="utf-8")
    assert check(copy).returncode == 0
