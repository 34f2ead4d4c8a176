"""An installed simcal Helm release's driver pod template, as ``simcal submit`` reads it.

The chart renders the driver pod once into the ConfigMap ``<fullname>-driver-template``
(labels ``app.kubernetes.io/instance: <release>``, ``app.kubernetes.io/component:
driver-template``, key ``pod-template.yaml``). :func:`read_template` reads it from the
cluster through the Kubernetes API; ``--dry-run`` takes it from ``helm template`` output
(``--template FILE``) or renders the local chart with helm-python-sdk (``--values FILE``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from simcal.config import ConfigError
from simcal.kube_manifests import TEMPLATE_COMPONENT, TEMPLATE_KEY

#: The chart in a source checkout (``pip install -e .``); ``--chart`` names another.
SOURCE_CHART = Path(__file__).resolve().parents[2] / "helm" / "simcal"


class SubmitError(RuntimeError):
    """The Kubernetes client is missing, not configured, or the API refused a request."""


def kube_client() -> Any:
    """The ``kubernetes.client`` module, configured from ``$KUBECONFIG``/in-cluster."""
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
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
    return client


def _selector(release: str, component: str | None = None) -> str:
    selector = f"app.kubernetes.io/name=simcal,app.kubernetes.io/instance={release}"
    return f"{selector},app.kubernetes.io/component={component}" if component else selector


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        template = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: the driver template is not YAML: {exc}") from None
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        raise ConfigError(f"{source}: the driver template has no pod spec")
    return template


def read_template(release: str, namespace: str) -> dict[str, Any]:
    """The release's driver pod template from the cluster.

    A release that does not exist, or one installed by a chart without the template (older
    than this simcal), is a ConfigError naming what to do.
    """
    client = kube_client()
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    core = client.CoreV1Api()
    try:
        found = core.list_namespaced_config_map(
            namespace, label_selector=_selector(release, TEMPLATE_COMPONENT)
        ).items
        if found:
            return _parse((found[0].data or {}).get(TEMPLATE_KEY, ""), found[0].metadata.name)
        installed = core.list_namespaced_config_map(
            namespace, label_selector=_selector(release)
        ).items
    except ApiException as exc:
        raise SubmitError(f"the Kubernetes API refused: {exc.status} {exc.reason}") from None
    except HTTPError as exc:
        raise SubmitError(f"cannot reach the Kubernetes API: {exc}") from None
    if installed:
        raise ConfigError(
            f"release {release!r} in namespace {namespace!r} has no driver template: it was "
            f"installed with an older simcal chart. Upgrade it to this simcal's chart first "
            f"(helm upgrade {release} ./helm/simcal -n {namespace} --reuse-values), then submit"
        )
    raise ConfigError(
        f"no simcal release {release!r} in namespace {namespace!r} "
        f"(see `helm list -n {namespace}`; --namespace names another)"
    )


def template_from_manifests(text: str, release: str, source: str) -> dict[str, Any]:
    """The driver template ConfigMap of ``release`` among ``helm template`` output documents."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not YAML: {exc}") from None
    for document in documents:
        labels = (document.get("metadata") or {}).get("labels") or {}
        if (
            document.get("kind") == "ConfigMap"
            and labels.get("app.kubernetes.io/component") == TEMPLATE_COMPONENT
            and labels.get("app.kubernetes.io/instance") == release
        ):
            return _parse((document.get("data") or {}).get(TEMPLATE_KEY, ""), source)
    raise ConfigError(
        f"{source} has no driver template of release {release!r} (a ConfigMap labelled "
        f"app.kubernetes.io/component={TEMPLATE_COMPONENT}): render it with "
        f"`helm template {release} ./helm/simcal -f VALUES` of this simcal's chart"
    )


def render_chart(
    release: str, namespace: str, values: dict[str, Any], chart: Path
) -> dict[str, str]:
    """Every template of ``chart`` rendered offline (helm-python-sdk): path -> text."""
    try:
        import helm_python
    except ImportError:
        raise ConfigError(
            "--dry-run without --template renders the chart locally and needs helm-python-sdk "
            "(pip install helm-python-sdk); or pass --template FILE, the output of "
            "`helm template RELEASE ./helm/simcal -f VALUES`"
        ) from None
    if not (chart / "Chart.yaml").is_file():
        raise ConfigError(f"--chart {str(chart)!r}: no Chart.yaml there")
    values = {**values, "operator": {**values.get("operator", {}), "skipCheck": True}}
    try:
        rendered: dict[str, str] = helm_python.Chart.load(chart).render(
            values, name=release, namespace=namespace
        )
    except Exception as exc:  # the chart's own schema and fail messages
        raise ConfigError(f"rendering {chart} failed: {exc}") from None
    return rendered


def template_for_dry_run(args: argparse.Namespace) -> dict[str, Any]:
    """``--template FILE``, else the local chart rendered with ``--values FILE`` (or none)."""
    if args.template:
        try:
            text = args.template.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--template {str(args.template)!r}: {exc.strerror}") from None
        return template_from_manifests(text, args.release, f"--template {args.template}")
    values: dict[str, Any] = {}
    if args.values:
        try:
            values = yaml.safe_load(args.values.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--values {str(args.values)!r}: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--values {str(args.values)!r}: not a mapping")
    rendered = render_chart(args.release, args.namespace, values, args.chart or SOURCE_CHART)
    text = "\n---\n".join(t for p, t in sorted(rendered.items()) if p.endswith(".yaml"))
    return template_from_manifests(text, args.release, "the rendered chart")
