"""Debian's Prometheus inside the local cluster's network namespace, scraping the chart's pods
found through the real API server, with the chart's rules loaded.

Debian's Prometheus (2.42.0+ds) is built without Kubernetes service discovery: a config with
``kubernetes_sd_configs`` fails with "field kubernetes_sd_configs not found in type
config.ScrapeConfig". What stands in: ``file_sd_configs`` whose file :func:`discover` writes from
the API server's pod list, applying the same rules a ``role: pod`` discovery with the usual
relabeling would (the chart's ``prometheus.io/scrape|port|path`` annotations, job = the pod's
``simcal/scrape-job`` label or its Service's, Running pods only)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

import yaml

NETNS = "/run/netns/simcal-k8s"
PORT = 19090  # inside the namespace only (its own loopback)


def discover(pods: list[dict], services: list[dict]) -> list[dict]:
    """file_sd target groups for the pods (``kubectl get pods -o json`` items) the chart
    annotates for scraping; job = the pod's ``simcal/scrape-job`` label, else that of a
    Service selecting it (the driver's pods: the chart labels their Service)."""
    jobs_by_selector = [
        (svc["spec"].get("selector") or {}, svc["metadata"]["labels"]["simcal/scrape-job"])
        for svc in services if "simcal/scrape-job" in svc["metadata"].get("labels", {})
    ]
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status", {})
        notes, labels = meta.get("annotations", {}), meta.get("labels", {})
        if notes.get("prometheus.io/scrape") != "true" or status.get("phase") != "Running":
            continue
        job = labels.get("simcal/scrape-job") or next(
            (name for selector, name in jobs_by_selector
             if selector and selector.items() <= labels.items()), None)
        if not status.get("podIP") or job is None:
            continue
        groups.append({
            "targets": [f"{status['podIP']}:{notes['prometheus.io/port']}"],
            "labels": {"job": job, "namespace": meta["namespace"], "pod": meta["name"],
                       "__metrics_path__": notes.get("prometheus.io/path", "/metrics")},
        })
    return groups


def config(rules: Path, targets: Path, interval: str = "5s") -> dict:
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules)],
        "scrape_configs": [{
            "job_name": "kubernetes-pods",
            "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "5s"}],
        }],
    }


class LivePrometheus:
    """``prometheus`` started in the cluster's namespace; queried from inside it."""

    def __init__(self, directory: Path, rules: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (make system-deps)")
        self.targets = directory / "targets.json"
        self.update([], [])
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config(rules, self.targets)))
        self.log_path = directory / "prometheus.log"
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            ["nsenter", f"--net={NETNS}", binary,
             f"--config.file={directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{PORT}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while self._get("/-/ready") is None:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("Prometheus did not become ready:\n"
                                   + self.log_path.read_text()[-3000:])
            time.sleep(1)

    def update(self, pods: list[dict], services: list[dict]) -> None:
        """Rewrite the discovered targets from the API server's current pods and Services."""
        partial = self.targets.with_suffix(".partial")
        partial.write_text(json.dumps(discover(pods, services)))
        partial.rename(self.targets)

    def _get(self, path: str) -> bytes | None:
        result = subprocess.run(
            ["nsenter", f"--net={NETNS}", "curl", "-sf", f"http://127.0.0.1:{PORT}{path}"],
            capture_output=True, timeout=30,
        )
        return result.stdout if result.returncode == 0 else None

    def api(self, path: str, **params: str) -> dict:
        body = self._get(f"/api/v1/{path}?" + urllib.parse.urlencode(params))
        assert body is not None, f"Prometheus /api/v1/{path} failed"
        reply = json.loads(body)
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.log.close()
