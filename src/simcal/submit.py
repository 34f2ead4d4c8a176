"""``simcal submit``: one more calibration Job against an installed Helm release.

Reads the release's driver pod template (:mod:`simcal.release`), and creates a ConfigMap with
the config, its local model source and data files, and the driver Job around that pod (see
:mod:`simcal.kube_manifests`) through the Kubernetes API with the ``kubernetes`` client
(``pip install 'simcal[kubernetes]'``), using the kubeconfig (``$KUBECONFIG``,
``~/.kube/config``) or the in-cluster service account. ``--dry-run`` prints the manifests as
YAML instead and touches no cluster.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from simcal.argtypes import positive_int as _positive_int
from simcal.config import CalibrationConfig, ConfigError, load_config
from simcal.exits import EXIT_FAILURE, EXIT_OK
from simcal.kube_manifests import CONFIG_MAP_LIMIT, Submission
from simcal.release import SubmitError, kube_client, read_template, template_for_dry_run
from simcal.shipping import SKIPPED_PARTS, local_code, top_module


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
    submit.add_argument("--config", type=Path, help="calibration YAML (required unless --results)")
    submit.add_argument(
        "--results",
        metavar="STUDY",
        help="instead of a calibration: a Job printing `simcal results` of STUDY from the "
        "release's storage to its log (kubectl logs job/NAME > results.csv)",
    )
    submit.add_argument("--format", choices=("csv", "json"), default="csv", help="with --results")
    submit.add_argument(
        "--namespace", default="default", type=_namespace, help="the release's namespace"
    )
    submit.add_argument(
        "--dry-run",
        action="store_true",
        help="print the manifests; do not touch any cluster (the driver pod comes from "
        "--template, else from rendering the chart locally with --values)",
    )
    submit.add_argument(
        "--template",
        type=Path,
        help="with --dry-run: `helm template` output holding the release's driver template",
    )
    submit.add_argument(
        "--values",
        type=Path,
        help="with --dry-run: the release's values file, rendered with the local chart "
        "(needs helm-python-sdk)",
    )
    submit.add_argument(
        "--chart", type=Path, help="with --dry-run: the chart folder (default: helm/simcal)"
    )
    submit.add_argument("--image", help="driver image (default: the release's)")
    submit.add_argument(
        "--min-workers",
        type=_positive_int,
        help="workers to wait for (default: the release's worker count)",
    )
    submit.set_defaults(handler=cmd_submit)


def submission(args: argparse.Namespace, pod_template: dict[str, Any]) -> Submission:
    """The validated :class:`Submission` for the parsed arguments (ConfigError if invalid)."""
    config = load_config(args.config)
    files, notes = job_files(args.config, config)
    return Submission(
        release=args.release,
        namespace=args.namespace,
        files=files,
        pod_template=pod_template,
        grace_period=config.grace_period,
        min_workers=args.min_workers or config.min_workers,
        image=args.image,
        notes=notes,
    )


def _results(args: argparse.Namespace, template: dict[str, Any]) -> int:
    job = Submission(args.release, args.namespace, {}, template, image=args.image)
    manifest = job.results_job(args.results, args.format)
    if args.dry_run:
        sys.stdout.write(to_yaml([manifest]))
        return EXIT_OK
    try:
        name = create_job(job.namespace, manifest)
    except SubmitError as exc:
        print(f"simcal: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"job.batch/{name} created in namespace {job.namespace}")
    print(f"kubectl wait -n {job.namespace} --for=condition=complete job/{name}")
    print(f"kubectl logs -n {job.namespace} job/{name} > {args.results}.{args.format}")
    return EXIT_OK


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
    if not args.dry_run and (args.template or args.values or args.chart):
        raise ConfigError("--template, --values and --chart only go with --dry-run")
    if (args.config is None) == (args.results is None):
        raise ConfigError("give either --config FILE (a calibration) or --results STUDY")
    if args.config is not None:  # bad input is reported before any cluster is asked
        job_files(args.config, load_config(args.config))
    try:
        if args.dry_run:
            template = template_for_dry_run(args)
        else:
            template = read_template(args.release, args.namespace)
    except SubmitError as exc:
        print(f"simcal: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.results is not None:
        return _results(args, template)
    job = submission(args, template)
    for note in job.notes:
        print(f"simcal: note: {note}", file=sys.stderr)
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


def create(job: Submission) -> str:
    """Create the ConfigMap (reused if it exists: it is named by content) and the Job; return
    the Job's generated name."""
    client = kube_client()
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

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


def create_job(namespace: str, manifest: dict[str, Any]) -> str:
    """Create one Job; return its generated name."""
    client = kube_client()
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        created = client.BatchV1Api().create_namespaced_job(namespace, manifest)
    except ApiException as exc:
        raise SubmitError(f"the Kubernetes API refused: {_api_message(exc)}") from None
    except HTTPError as exc:
        raise SubmitError(f"cannot reach the Kubernetes API: {exc}") from None
    return str(created.metadata.name)


def job_files(path: Path, config: CalibrationConfig) -> tuple[dict[str, bytes], list[str]]:
    """What the calibration ConfigMap carries, by relative path: the config (without
    ``storage:``), CSV files at their path relative to the config's folder, and local
    model/loss/data modules at their path relative to their import root (``mysir/__init__.py``
    for a package ``mysir`` imported from ``own-model/mysir/``), so that they import in the pod,
    where the config's folder is on ``sys.path``; and notes.

    Everything must sit in the config's folder tree, no two files on one path, and fit a
    ConfigMap (ConfigError if not).
    """
    base = path.resolve().parent
    text = path.read_text(encoding="utf-8")
    notes = []
    data = yaml.safe_load(text) or {}
    if "storage" in data:
        del data["storage"]
        text = yaml.safe_dump(data, sort_keys=False)
        notes.append(
            "storage: in the config is replaced by the release's storage (its PVC or its "
            "storage.existingSecret) and left out of the submitted ConfigMap"
        )
    files: dict[str, Path] = {}

    def carry(source: Path, field: str, what: str, root: Path = base) -> None:
        """Carry ``source`` (a file or folder) at its path relative to ``root``."""
        if not source.resolve().is_relative_to(base):
            raise ConfigError(
                f"invalid config:\n  {field}: {what} {str(source)!r} is outside the config's "
                f"folder {str(base)!r}; a submitted job carries only files inside it. Move it "
                f"there, or put it in the image (examples/Dockerfile) or on a volume"
            )
        for file in [source] if source.is_file() else sorted(source.rglob("*")):
            relative = file.resolve().relative_to(root.resolve())
            if not file.is_file() or SKIPPED_PARTS & set(relative.parts):
                continue
            key = relative.as_posix()
            if key in files and files[key].resolve() != file.resolve():
                raise ConfigError(
                    f"invalid config:\n  {field}: {what} file {str(file)!r} would be carried "
                    f"as {key!r}, which {str(files[key])!r} already is; rename one of them"
                )
            files[key] = file

    for index, target in enumerate(config.targets):
        if target.observed_file is not None:
            carry(target.observed_file, f"targets.{index}.observed", "data file")
    references = [("model", config.model)] + [
        (f"targets.{i}.{key}", getattr(t, key))
        for i, t in enumerate(config.targets)
        for key in ("observed", "loss")
        if isinstance(getattr(t, key), str) and ":" in getattr(t, key)
    ]
    for field, reference in references:
        source = local_code(top_module(reference))
        if source is not None:
            # At its path below its import root (the sys.path entry it was found in), put at
            # the top of the tree: the pod has the config's folder on sys.path.
            carry(source, field, "module", root=source.parent)
    payload = {"calibration.yaml": text.encode("utf-8")}
    payload.update({name: file.read_bytes() for name, file in sorted(files.items())})
    size = sum(len(content) for content in payload.values())
    if size > CONFIG_MAP_LIMIT:
        biggest = sorted(payload, key=lambda name: -len(payload[name]))[:3]
        raise ConfigError(
            f"the config, model and data files take {size // 1024} KiB (largest: "
            f"{', '.join(biggest)}), more than a ConfigMap holds ({CONFIG_MAP_LIMIT // 1024} "
            f"KiB). Bake the model into an image FROM simcal's (examples/Dockerfile) and set "
            f"image.repository/image.tag, and put large data on a volume or in the image"
        )
    return payload, notes


def _api_message(exc: Any) -> str:
    """``<status> <reason>: <message of the Status body>``."""
    try:
        message = json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = exc.body or ""
    return f"{exc.status} {exc.reason}: {message}".rstrip(": ")
