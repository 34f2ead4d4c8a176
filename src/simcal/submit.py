"""``simcal submit``: one more calibration Job against an installed Helm release.

Creates the config's ConfigMap and the driver Job (see :mod:`simcal.kube_manifests`) through
the Kubernetes API with the ``kubernetes`` client (``pip install 'simcal[kubernetes]'``), using
the kubeconfig (``$KUBECONFIG``, ``~/.kube/config``) or the in-cluster service account.
``--dry-run`` prints the manifests as YAML instead and touches no cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from simcal.argtypes import positive_int as _positive_int
from simcal.config import ConfigError, load_config
from simcal.exits import EXIT_FAILURE, EXIT_OK
from simcal.kube_manifests import IMAGE, Submission


def _dns_label(text: str, max_length: int) -> str:
    if len(text) > max_length or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", text):
        raise argparse.ArgumentTypeError(
            f"expected lowercase letters, digits and '-' (at most {max_length}), got {text!r}"
        )
    return text


def _release(text: str) -> str:
    # Room for "-calibration-<10 hex digits>" in a 63-character name.
    return _dns_label(text, 41)


def _namespace(text: str) -> str:
    return _dns_label(text, 63)


def add_submit_parser(commands: argparse._SubParsersAction) -> None:
    """The ``submit`` subcommand."""
    submit = commands.add_parser(
        "submit", help="run a calibration as a Kubernetes Job against an installed release"
    )
    submit.add_argument("--release", required=True, type=_release, help="the Helm release name")
    submit.add_argument("--config", required=True, type=Path, help="calibration YAML")
    submit.add_argument(
        "--namespace", default="default", type=_namespace, help="the release's namespace"
    )
    submit.add_argument(
        "--dry-run", action="store_true", help="print the manifests; do not touch any cluster"
    )
    submit.add_argument("--image", default=IMAGE, help=f"driver image (default {IMAGE})")
    submit.add_argument(
        "--min-workers",
        type=_positive_int,
        help="workers to wait for (default: the config's min_workers, else 8)",
    )
    submit.add_argument(
        "--storage-secret",
        help="Secret whose key 'url' holds the storage URL (the release's storage.existingSecret)",
    )
    submit.set_defaults(handler=cmd_submit)


def submission(args: argparse.Namespace) -> Submission:
    """The validated :class:`Submission` for the parsed arguments (ConfigError if invalid)."""
    config = load_config(args.config)
    text = args.config.read_text(encoding="utf-8")
    if "storage" in (yaml.safe_load(text) or {}):
        raise ConfigError(
            "invalid config:\n  storage: not allowed in a submitted config; the release's "
            "storage is used (its PVC, or --storage-secret), and a URL here would end up in a "
            "ConfigMap"
        )
    return Submission(
        release=args.release,
        namespace=args.namespace,
        config_text=text,
        grace_period=config.grace_period,
        min_workers=args.min_workers or config.min_workers or 8,
        image=args.image,
        storage_secret=args.storage_secret,
    )


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the config) as YAML literal blocks."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_LiteralDumper.add_representer(str, _LiteralDumper.represent_str)


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    return yaml.dump_all(manifests, Dumper=_LiteralDumper, sort_keys=False)


def cmd_submit(args: argparse.Namespace) -> int:
    """``simcal submit``: create the ConfigMap and the Job, or print them (``--dry-run``)."""
    job = submission(args)
    if args.dry_run:
        sys.stdout.write(to_yaml(job.manifests()))
        return EXIT_OK
    try:
        name = create(job)
    except SubmitError as exc:
        print(f"simcal: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"job.batch/{name} created in namespace {job.namespace}")
    print(f"follow it: kubectl logs -n {job.namespace} -f job/{name}")
    return EXIT_OK


class SubmitError(RuntimeError):
    """The Kubernetes client is missing, not configured, or the API refused a request."""


def create(job: Submission) -> str:
    """Create the ConfigMap (reused if it exists: it is named by content) and the Job; return
    the Job's generated name."""
    try:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException
        from kubernetes.config.config_exception import ConfigException
        from urllib3.exceptions import HTTPError
    except ImportError:
        raise SubmitError(
            "simcal submit needs the Kubernetes client: pip install 'simcal[kubernetes]'"
        ) from None
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config()
        else:
            # Read $KUBECONFIG now: the client reads it once, when first imported.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    except ConfigException as exc:
        raise SubmitError(f"no Kubernetes configuration: {exc}") from None
    config_map, job_manifest = job.manifests()
    try:
        try:
            client.CoreV1Api().create_namespaced_config_map(job.namespace, config_map)
            print(f"configmap/{job.config_map_name} created")
        except ApiException as exc:
            if exc.status != 409:
                raise
            print(f"configmap/{job.config_map_name} exists (same content): reused")
        created = client.BatchV1Api().create_namespaced_job(job.namespace, job_manifest)
    except ApiException as exc:
        raise SubmitError(f"the Kubernetes API refused: {_api_message(exc)}") from None
    except HTTPError as exc:
        raise SubmitError(f"cannot reach the Kubernetes API: {exc}") from None
    return str(created.metadata.name)


def _api_message(exc: Any) -> str:
    """``<status> <reason>: <message of the Status body>``."""
    try:
        message = json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = exc.body or ""
    return f"{exc.status} {exc.reason}: {message}".rstrip(": ")
