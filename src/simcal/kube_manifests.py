"""Kubernetes manifests for one more calibration against an installed simcal Helm release.

A ConfigMap holding the calibration config and a Job (``generateName: <release>-calibration-``)
whose pod is the chart's driver pod with default values, as in ``k8s/calibration-job.yaml``,
but reading the config from that ConfigMap. tests/test_submit.py keeps the pod equal to the
chart's and to ``k8s/calibration-job.yaml``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from simcal import __version__

IMAGE = f"ghcr.io/simcal/simcal:{__version__}"
CONFIG_DIR = "/etc/simcal"
SQLITE_URL = "sqlite:////data/simcal.db"
UID = 1000


def release_fullname(release: str) -> str:
    """The chart's resource name prefix (``simcal.fullname``, no overrides)."""
    name = release if "simcal" in release else f"{release}-simcal"
    return name[:63].rstrip("-")


def _security_context(*, pod: bool) -> dict[str, Any]:
    """The chart's default pod or container security context."""
    common: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if pod:
        return {**common, "fsGroup": UID}
    return {
        **common,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


@dataclass(frozen=True)
class Submission:
    """One calibration run: ``config_text`` against the release's scheduler and storage.

    Storage is the release's PVC (SQLite), or with ``storage_secret`` the URL under key
    ``url`` of that Secret (the chart's ``storage.existingSecret``).
    """

    release: str
    namespace: str
    config_text: str
    grace_period: float = 30.0
    min_workers: int = 8
    image: str = IMAGE
    storage_secret: str | None = None

    @property
    def config_map_name(self) -> str:
        """Named by content: submitting the same config again reuses the ConfigMap."""
        digest = hashlib.sha256(self.config_text.encode()).hexdigest()[:10]
        return f"{self.release}-calibration-{digest}"

    @property
    def sqlite(self) -> bool:
        """Whether storage is SQLite on the release's PVC (no ``storage_secret``)."""
        return self.storage_secret is None

    def labels(self, component: str) -> dict[str, str]:
        """The release's labels: its NetworkPolicy admits the pod, its ServiceMonitor scrapes it."""
        return {
            "app.kubernetes.io/name": "simcal",
            "app.kubernetes.io/instance": self.release,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "simcal",
        }

    def manifests(self) -> list[dict[str, Any]]:
        return [self.config_map(), self.job()]

    def config_map(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.config_map_name,
                "namespace": self.namespace,
                "labels": {**self.labels("config"), "app.kubernetes.io/managed-by": "simcal"},
            },
            "data": {"calibration.yaml": self.config_text},
        }

    def job(self) -> dict[str, Any]:
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "generateName": f"{self.release}-calibration-",
                "namespace": self.namespace,
                "labels": self.labels("driver"),
            },
            "spec": {
                # A retried driver resumes the study from storage.
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
                "template": {
                    "metadata": {
                        "labels": self.labels("driver"),
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": "8000",
                            "prometheus.io/path": "/metrics",
                        },
                    },
                    "spec": self.pod_spec(),
                },
            },
        }

    def pod_spec(self) -> dict[str, Any]:
        fullname = release_fullname(self.release)
        return {
            "restartPolicy": "Never",
            "serviceAccountName": fullname,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": _security_context(pod=True),
            "terminationGracePeriodSeconds": int(self.grace_period) + 30,
            "containers": [self._driver(fullname)],
            "volumes": [
                {"name": "config", "configMap": {"name": self.config_map_name}},
                *(
                    [{"name": "data", "persistentVolumeClaim": {"claimName": f"{fullname}-data"}}]
                    if self.sqlite
                    else []
                ),
                {"name": "tmp", "emptyDir": {}},
                {"name": "home", "emptyDir": {}},
            ],
        }

    def _driver(self, fullname: str) -> dict[str, Any]:
        scheduler = f"tcp://{fullname}-scheduler.{self.namespace}.svc.cluster.local:8786"
        env: list[dict[str, Any]] = [
            {"name": "HOME", "value": "/home/simcal"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ]
        if not self.sqlite:
            secret = {"name": self.storage_secret, "key": "url"}
            env.append({"name": "SIMCAL_STORAGE", "valueFrom": {"secretKeyRef": secret}})
        return {
            "name": "driver",
            "image": self.image,
            "imagePullPolicy": "IfNotPresent",
            "args": [
                "simcal", "run",
                "--config", f"{CONFIG_DIR}/calibration.yaml",
                "--scheduler", scheduler,
                "--metrics-port", "8000",
                "--min-workers", str(self.min_workers),
                "--metrics-linger", "60",
                "--connect-timeout", "900",
                *(["--storage", SQLITE_URL] if self.sqlite else []),
            ],
            "env": env,
            "ports": [{"name": "metrics", "containerPort": 8000, "protocol": "TCP"}],
            "readinessProbe": {  # as the chart's simcal.httpProbe writes it
                "httpGet": {"path": "/metrics", "port": "metrics"},
                "initialDelaySeconds": 0,
                "periodSeconds": 10,
                "timeoutSeconds": 5,
                "failureThreshold": 3,
            },
            "resources": {
                "limits": {"memory": "2Gi"},
                "requests": {"cpu": "500m", "memory": "1Gi"},
            },
            "securityContext": _security_context(pod=False),
            "volumeMounts": [
                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                *([{"name": "data", "mountPath": "/data"}] if self.sqlite else []),
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "home", "mountPath": "/home/simcal"},
            ],
        }
