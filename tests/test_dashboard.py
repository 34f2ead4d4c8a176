"""The Grafana dashboard: structure, variables, panels, and PromQL that promtool accepts and
that only uses metrics simcal, its recording rules or Dask export."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from dashboard_queries import (
    dashboard_queries,
    iter_panels,
    load_dashboard,
    metric_selectors,
    raw_queries,
    substitute,
)
from monitoring import promtool

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
RULES = ROOT / "helm" / "simcal" / "files" / "prometheus-rules.yaml"
GENERATOR = ROOT / "scripts" / "make_dashboard.py"
DATASOURCE_REF = "${datasource}"
STUDY_FILTER = 'study=~"$study"'


@pytest.fixture(scope="module")
def dashboard():
    return load_dashboard()


def panels(dashboard):
    return [p for p in iter_panels(dashboard["panels"]) if p.get("type") != "row"]


def exported_metrics() -> set[str]:
    """simcal's metrics (docs/architecture.md), their sample suffixes, and the rules' records."""
    names = set(re.findall(r"\bsimcal_[a-z_]+", ARCHITECTURE.read_text()))
    assert "simcal_trials_total" in names, "architecture.md no longer lists the driver metrics"
    samples = set(names)
    for name in names:
        samples |= {name + suffix for suffix in ("_bucket", "_sum", "_count", "_created")}
        if name.endswith("_total"):
            samples.add(name.removesuffix("_total") + "_created")
    rules = yaml.safe_load(RULES.read_text())
    records = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    return samples | records


def is_known(metric: str, known: set[str]) -> bool:
    return metric in known or metric.startswith(("dask_scheduler_", "dask_worker_"))




def test_metric_selectors_scanner():
    expr = (
        'histogram_quantile(0.95, sum by (study, le) (rate(simcal_trial_duration_seconds_bucket'
        '{study=~"$study"}[5m]))) / on (study) group_left () up offset 75m and x:y:z > 1e3'
    )
    assert metric_selectors(expr) == [
        ("simcal_trial_duration_seconds_bucket", '{study=~"$study"}'),
        ("up", ""),
        ("x:y:z", ""),
    ]
    assert metric_selectors("sum(rate(a_total[5m])) by (job) * 60") == [("a_total", "")]


def test_dashboard_identity(dashboard):
    assert dashboard["uid"] == "simcal-overview"
    assert dashboard["title"] == "simcal calibration"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 39


def test_json_is_generated_from_the_script():
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_template_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    study = variables["study"]
    assert study["type"] == "query"
    query = study["query"]["query"] if isinstance(study["query"], dict) else study["query"]
    assert query == "label_values(simcal_trials_total, study)"
    assert study["multi"] is True and study["includeAll"] is True
    assert study["allValue"] == ".*"
    assert study["datasource"]["uid"] == DATASOURCE_REF


def test_panels_have_ids_grid_positions_and_datasource(dashboard):
    found = panels(dashboard)
    assert len(found) >= 8
    ids = [p.get("id") for p in iter_panels(dashboard["panels"])]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for panel in found:
        grid = panel.get("gridPos", {})
        assert {"x", "y", "w", "h"} <= set(grid), panel["title"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["h"] > 0
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == DATASOURCE_REF, panel["title"]
        assert panel.get("targets"), f"{panel['title']}: no queries"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == DATASOURCE_REF


def test_panels_do_not_overlap(dashboard):
    def cells(panel):
        g = panel["gridPos"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        return {(x, y) for x in xs for y in ys}

    for a, b in combinations(panels(dashboard), 2):
        assert not cells(a) & cells(b), f"{a['title']!r} overlaps {b['title']!r}"


def panel_exprs(dashboard) -> dict[str, str]:
    return {p["title"]: "\n".join(t["expr"] for t in p["targets"]) for p in panels(dashboard)}


REQUIRED_PANELS = {
    "trials per minute against the regression threshold": [
        "simcal:trials_per_minute:rate5m{",
        "0.7 * simcal:trials_per_minute:baseline3h{",
    ],
    "worker utilization": ["simcal_worker_utilization_ratio{"],
    "errors by reason": ["rate(simcal_trial_errors_total{", "by (study, reason)"],
    "in-flight trials": ["simcal_inflight_trials{"],
    "workers vs minimum": ["simcal_workers{", "simcal_min_workers{"],
    "trial duration p50/p95": [
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "simcal_trial_duration_seconds_bucket{",
        "by (study, le)",
    ],
    "best loss": ["simcal_best_loss{"],
    "dask scheduler task states": ["dask_scheduler_tasks", "by (state)"],
    "driver busy ratio": ["simcal_driver_busy_ratio{", "avg by (study)"],
    "storage time per operation": [
        "simcal_storage_seconds_bucket{",
        "by (study, operation, le)",
    ],
}


@pytest.mark.parametrize("what", sorted(REQUIRED_PANELS))
def test_required_panel(dashboard, what):
    needles = REQUIRED_PANELS[what]
    matching = [t for t, e in panel_exprs(dashboard).items() if all(n in e for n in needles)]
    assert matching, f"no panel shows {what} (queries containing {needles})"


def test_threshold_line_matches_the_alert(dashboard):
    rules = yaml.safe_load(RULES.read_text())
    alert = next(
        r for g in rules["groups"] for r in g["rules"]
        if r.get("alert") == "SimcalThroughputRegression"
    )
    assert "0.7 * simcal:trials_per_minute:baseline3h" in alert["expr"]
    assert any("0.7 * simcal:trials_per_minute:baseline3h" in q for q in raw_queries(dashboard))


def test_simcal_queries_filter_by_study(dashboard):
    for expr in raw_queries(dashboard):
        for name, matchers in metric_selectors(expr):
            if name.startswith("simcal"):
                assert STUDY_FILTER in matchers, f"{name} not filtered by {STUDY_FILTER}: {expr}"


def test_queries_use_only_exported_metrics(dashboard):
    known = exported_metrics()
    queries = raw_queries(dashboard)
    names = {name for expr in queries for name, _ in metric_selectors(expr)}
    assert names, "no metric found in the dashboard's queries"
    unknown = sorted(n for n in names if not is_known(n, known))
    assert not unknown, f"metrics neither simcal, its recording rules nor Dask export: {unknown}"
    study = next(v for v in dashboard["templating"]["list"] if v["name"] == "study")
    variable_metric = re.search(r"label_values\((\w+)", study["query"]["query"]).group(1)
    assert is_known(variable_metric, known)


def test_alert_rules_use_only_exported_metrics():
    known = exported_metrics() | {"up"}
    rules = yaml.safe_load(RULES.read_text())
    names = {
        name for g in rules["groups"] for r in g["rules"] for name, _ in metric_selectors(r["expr"])
    }
    assert "simcal_trials_total" in names
    assert not sorted(n for n in names if not is_known(n, known))


def test_queries_pass_promtool_check_rules(dashboard, tmp_path):
    queries = dashboard_queries(dashboard)
    assert len(queries) == sum(len(p["targets"]) for p in panels(dashboard))
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr + "\n".join(queries)


def test_dashboard_queries_substitutes_variables(dashboard):
    queries = dashboard_queries(dashboard)
    assert queries and not any("$" in q for q in queries), queries
    assert any('study=~".*"' in q for q in queries)
    narrowed = dashboard_queries(dashboard, study="seir", rate_interval="30s")
    assert any('study=~"seir"' in q for q in narrowed)
    assert any("[30s]" in q for q in narrowed)
    assert substitute("rate(x[${__rate_interval}])") == "rate(x[1m])"
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        substitute('x{job="$cluster"}')


def test_panels_named_in_alerts_exist(dashboard):
    """Alert descriptions send people to dashboard panels by their quoted title."""
    titles = {p["title"] for p in panels(dashboard)} | {dashboard["title"]}
    rules = yaml.safe_load(RULES.read_text())
    quoted = {
        phrase
        for g in rules["groups"]
        for r in g["rules"]
        if "alert" in r
        for phrase in re.findall(r'"([^"{}]+)"', r["annotations"]["description"])
    }
    assert quoted, "alert descriptions name no dashboard panel"
    missing = sorted(q for q in quoted if not any(t.startswith(q) for t in titles))
    assert not missing, f"panels named in alert descriptions but not on the dashboard: {missing}"


def test_the_dashboard_checked_here_is_the_one_the_chart_ships(dashboard):
    """What these tests check is what Helm renders into the Grafana ConfigMap."""
    from chart import render

    (configmap,) = [
        o
        for o in render()
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")
    ]
    (shipped,) = configmap["data"].values()
    assert json.loads(shipped) == dashboard
