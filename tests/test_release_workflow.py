"""The release workflow (.github/workflows/release.yml): it cannot run here (no GitHub runner,
no registry), so its syntax is checked against the GitHub workflow schema that
check-jsonschema vendors (offline), and its content against what the README promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "release.yml"
CHECK = [
    sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
]


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CHECK, str(path)], capture_output=True, text=True, timeout=120)


def test_release_workflow_matches_the_github_workflow_schema():
    result = check(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_broken_workflow(tmp_path):
    broken = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    del broken["jobs"]["image"]["runs-on"]
    path = tmp_path / "release.yml"
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    assert check(path).returncode != 0


def test_release_builds_a_multi_arch_image_on_version_tags_with_the_standard_actions():
    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert triggers == {"push": {"tags": ["v*"]}}
    steps = workflow["jobs"]["image"]["steps"]
    uses = [step["uses"].split("@")[0] for step in steps if "uses" in step]
    for action in ("docker/setup-qemu-action", "docker/setup-buildx-action",
                   "docker/login-action", "docker/build-push-action"):
        assert action in uses, action
    build = next(s for s in steps if s.get("uses", "").startswith("docker/build-push-action"))
    assert set(build["with"]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["with"]["push"] is True
    assert "ghcr.io/${{ github.repository_owner }}/simcal:" in build["with"]["tags"]
    assert "ARG VERSION" in (REPO / "Dockerfile").read_text(encoding="utf-8")
