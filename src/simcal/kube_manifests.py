"""Kubernetes manifests for one more calibration against an installed simcal Helm release.

The driver pod is the release's own: the chart renders it once (``simcal.driverPodTemplate``)
into its driver Job and into the ConfigMap ``<fullname>-driver-template``
(:data:`TEMPLATE_KEY`), which ``simcal submit`` reads. A :class:`Submission` wraps that pod
template in a Job (``generateName: <release>-calibration-``) whose config volume is a new
ConfigMap holding the calibration config and the files it needs (model source, data), so the
Job carries the release's image, pull secrets, resources, TLS, storage, scheduling and
``--min-workers``. ``k8s/calibration-job.yaml`` is this Job for the chart's defaults
(``make k8s-manifests``).
"""

from __future__ import annotations

import base64
import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TEMPLATE_KEY = "pod-template.yaml"
TEMPLATE_COMPONENT = "driver-template"
CONFIG_FILE = "calibration.yaml"
#: A ConfigMap holds at most 1 MiB (etcd's object limit); keep room for metadata.
CONFIG_MAP_LIMIT = 900 * 1024
#: Pod labels that describe the Helm release's own objects, not a submitted Job.
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version")


def config_map_key(path: str) -> str:
    """A ConfigMap key for a relative file path (keys cannot hold ``/``)."""
    return path.replace("/", "__")


def _arg(args: list[str], flag: str, value: str) -> None:
    if flag in args:
        args[args.index(flag) + 1] = value


@dataclass(frozen=True)
class Submission:
    """One calibration run: ``files`` (``calibration.yaml`` and what it needs, by relative
    path) in the driver pod of ``pod_template`` (the release's ``driver-template``)."""

    release: str
    namespace: str
    files: Mapping[str, bytes]
    pod_template: Mapping[str, Any]
    grace_period: float = 30.0
    min_workers: int | None = None
    image: str | None = None
    config_map: str | None = None  # an existing ConfigMap instead of a new one (k8s/)
    notes: list[str] = field(default_factory=list)

    @property
    def config_map_name(self) -> str:
        """Named by content: submitting the same files again reuses the ConfigMap."""
        if self.config_map:
            return self.config_map
        digest = hashlib.sha256()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + self.files[path] + b"\0")
        return f"{self.release}-calibration-{digest.hexdigest()[:10]}"

    def labels(self, component: str) -> dict[str, str]:
        """The release's labels: its NetworkPolicy admits the pod, its ServiceMonitor scrapes it."""
        return {
            "app.kubernetes.io/name": "simcal",
            "app.kubernetes.io/instance": self.release,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "simcal",
        }

    def manifests(self) -> list[dict[str, Any]]:
        return [self.config_map_manifest(), self.job()]

    def config_map_manifest(self) -> dict[str, Any]:
        data: dict[str, str] = {}
        binary: dict[str, str] = {}
        for path, content in sorted(self.files.items()):
            try:
                data[config_map_key(path)] = content.decode("utf-8")
            except UnicodeDecodeError:
                binary[config_map_key(path)] = base64.b64encode(content).decode("ascii")
        manifest: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.config_map_name,
                "namespace": self.namespace,
                "labels": {**self.labels("config"), "app.kubernetes.io/managed-by": "simcal"},
            },
            "data": data,
        }
        if binary:
            manifest["binaryData"] = binary
        return manifest

    def job(self) -> dict[str, Any]:
        metadata = copy.deepcopy(dict(self.pod_template.get("metadata") or {}))
        labels = {
            k: v for k, v in (metadata.get("labels") or {}).items() if k not in HELM_ONLY_LABELS
        }
        metadata["labels"] = labels
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "generateName": f"{self.release}-calibration-",
                "namespace": self.namespace,
                "labels": self.labels("driver"),
            },
            "spec": {
                # A retried driver resumes the study from storage (simcal resumes automatically).
                "backoffLimit": 6,
                "ttlSecondsAfterFinished": 7 * 24 * 3600,
                "podFailurePolicy": {
                    "rules": [
                        # Exit 2 is a bad config or bad arguments: retrying cannot help.
                        {
                            "action": "FailJob",
                            "onExitCodes": {
                                "containerName": "driver", "operator": "In", "values": [2]
                            },
                        },
                        # Node drains and preemptions do not count against backoffLimit.
                        {
                            "action": "Ignore",
                            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                        },
                    ]
                },
                "template": {"metadata": metadata, "spec": self.pod_spec()},
            },
        }

    def pod_spec(self) -> dict[str, Any]:
        """The release's driver pod spec with this submission's config, grace period, image
        and minimum worker count (the release's unless given)."""
        spec = copy.deepcopy(dict(self.pod_template["spec"]))
        spec["restartPolicy"] = "Never"  # podFailurePolicy needs it
        spec["terminationGracePeriodSeconds"] = int(self.grace_period) + 30
        for volume in spec.get("volumes", []):
            if volume.get("name") == "config":
                source: dict[str, Any] = {"name": self.config_map_name}
                if set(self.files) != {CONFIG_FILE}:  # folders inside: one item per file
                    source["items"] = [
                        {"key": config_map_key(path), "path": path} for path in sorted(self.files)
                    ]
                volume["configMap"] = source
        for container in spec.get("containers", []):
            if container.get("name") != "driver":
                continue
            if self.image:
                container["image"] = self.image
            if self.min_workers is not None:
                _arg(container.get("args", []), "--min-workers", str(self.min_workers))
        return spec

    def results_job(self, study: str, output_format: str = "csv") -> dict[str, Any]:
        """A Job that prints ``simcal results`` of ``study`` from the release's storage (its PVC
        or its Secret's URL) to its log: the release's driver pod, running ``simcal results``."""
        spec = copy.deepcopy(dict(self.pod_template["spec"]))
        spec["restartPolicy"] = "Never"
        spec["terminationGracePeriodSeconds"] = 30
        for container in spec.get("containers", []):
            if container.get("name") != "driver":
                continue
            args = container.get("args", [])
            storage = args[args.index("--storage") : args.index("--storage") + 2] if (
                "--storage" in args
            ) else []  # else $SIMCAL_STORAGE from the release's Secret
            container["args"] = [
                "simcal", "results", "--study", study, "--format", output_format, *storage
            ]
            container["name"] = "results"
            for key in ("ports", "readinessProbe", "livenessProbe"):
                container.pop(key, None)
            container["volumeMounts"] = [  # no calibration config: only storage is read
                m for m in container.get("volumeMounts", []) if m.get("name") != "config"
            ]
            if self.image:
                container["image"] = self.image
        spec["volumes"] = [v for v in spec.get("volumes", []) if v.get("name") != "config"]
        labels = self.labels("results")
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "generateName": f"{self.release}-results-",
                "namespace": self.namespace,
                "labels": labels,
            },
            "spec": {
                "backoffLimit": 2,
                "ttlSecondsAfterFinished": 24 * 3600,
                "template": {"metadata": {"labels": dict(labels)}, "spec": spec},
            },
        }
