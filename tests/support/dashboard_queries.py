"""The PromQL of the Grafana dashboard, with Grafana's variables replaced by concrete values.

Used by tests/test_dashboard.py (promtool syntax check, metric names) and by end-to-end tests
that run every panel query against a real Prometheus.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

DASHBOARD_FILE = (
    Path(__file__).resolve().parents[2] / "helm" / "simcal" / "files" / "grafana-dashboard.json"
)


def load_dashboard(path: Path = DASHBOARD_FILE) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def iter_panels(panels: list[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def raw_queries(dashboard: Mapping[str, Any]) -> list[str]:
    """Every panel target's `expr`, as written in the dashboard (variables unexpanded)."""
    return [
        target["expr"]
        for panel in iter_panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def substitute(
    expr: str, *, study: str = ".*", rate_interval: str = "1m", interval: str = "1m",
    range_: str = "1h",
) -> str:
    """Replace Grafana's variables with concrete values (``$study`` is a regex: ``.*`` = all)."""
    values = {
        "study": study,
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__range": range_,
        "datasource": "prometheus",
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", replace, expr)


def dashboard_queries(dashboard: Mapping[str, Any], **values: str) -> list[str]:
    """Concrete PromQL of every panel query, ``$study`` matching every study (``.*``).

    Keyword arguments (``study``, ``rate_interval``, ``interval``, ``range_``) override the
    substituted values, e.g. ``rate_interval="30s"`` against a Prometheus scraping every 5s.
    """
    return [substitute(expr, **values) for expr in raw_queries(dashboard)]


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTOR = re.compile(r'(?<![\w:.$"\'])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?')
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2", "by", "without",
             "on", "ignoring", "group_left", "group_right"}


def metric_selectors(expr: str) -> list[tuple[str, str]]:
    """``(metric name, label matchers)`` of every vector selector in a PromQL expression.

    A small scanner, enough for the dashboard's and the alert rules' PromQL: grouping
    clauses and ranges are dropped, identifiers followed by ``(`` are functions, and the
    ``{...}`` right after a name are its matchers ("" when there are none).
    """
    text = _GROUPING.sub(" ", expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    found = []
    for match in _SELECTOR.finditer(text):
        name, matchers = match.group(1), match.group(2) or ""
        rest = text[match.end():].lstrip()
        if name in _KEYWORDS or (not matchers and rest.startswith("(")):
            continue
        found.append((name, matchers))
    return found
