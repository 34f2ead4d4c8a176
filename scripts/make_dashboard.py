#!/usr/bin/env python3
"""Generate helm/simcal/files/grafana-dashboard.json, the "simcal calibration" dashboard.

Plain Python, no dependencies. Edit this script, not the JSON, then run:

    python scripts/make_dashboard.py           # rewrite the JSON
    python scripts/make_dashboard.py --check   # exit 1 if the JSON is out of date

The regression threshold drawn on "Trials per minute" is 0.7 x
simcal:trials_per_minute:baseline3h, the same expression SimcalThroughputRegression uses
(helm/simcal/files/prometheus-rules.yaml).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "helm" / "simcal" / "files" / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
STUDY = 'study=~"$study"'
DASHED = {"fill": "dash", "dash": [10, 10]}


def target(ref: str, expr: str, legend: str) -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "editorMode": "code",
    }


def dashed(ref: str, color: str | None = None) -> dict[str, Any]:
    """A field override: the series of query ``ref`` as a dashed line (thresholds, minimums)."""
    properties: list[dict[str, Any]] = [{"id": "custom.lineStyle", "value": DASHED}]
    if color:
        properties.append({"id": "color", "value": {"mode": "fixed", "fixedColor": color}})
    return {"matcher": {"id": "byFrameRefID", "options": ref}, "properties": properties}


def timeseries(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    grid: tuple[int, int, int, int],
    *,
    unit: str = "short",
    minimum: float | None = 0,
    maximum: float | None = None,
    threshold: float | None = None,
    overrides: list[dict[str, Any]] | None = None,
    stack: bool = False,
) -> dict[str, Any]:
    x, y, w, h = grid
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "custom": {
            "drawStyle": "line",
            "lineWidth": 2,
            "fillOpacity": 20 if stack else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line+area" if threshold is not None else "off"},
        },
        "thresholds": {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}]
            + ([{"color": "red", "value": threshold}] if threshold is not None else []),
        },
    }
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def panels() -> list[dict[str, Any]]:
    rate = "$__rate_interval"
    items = [
        timeseries(
            "Trials per minute",
            "Finished (completed or pruned) trials per minute per study (5m rate), and of them "
            "the pruned ones (replicate-aware pruning: throughput, not errors), against the "
            "regression threshold "
            "(dashed): 70% of the study's mean rate over [now-3h15m, now-15m]. "
            "SimcalThroughputRegression fires when the rate stays below it for 10m with "
            "trials in flight; the threshold appears once a study has an hour of history.",
            [
                target("A", f"simcal:trials_per_minute:rate5m{{{STUDY}}}", "{{study}}"),
                target(
                    "B",
                    f"0.7 * simcal:trials_per_minute:baseline3h{{{STUDY}}}",
                    "{{study}} regression threshold (70% of baseline)",
                ),
                target(
                    "C",
                    f'sum by (study) (rate(simcal_trials_total{{status="pruned",{STUDY}}}'
                    f"[{rate}])) * 60",
                    "{{study}} of which pruned",
                ),
            ],
            (0, 0, 12, 8),
            unit="suffix: trials/min",
            overrides=[dashed("B", "red")],
        ),
        timeseries(
            "Worker utilization",
            "Busy task-seconds / (worker threads x wall time), trailing window. "
            "SimcalLowWorkerUtilization fires below 0.5 for 15m with trials in flight.",
            [target("A", f"simcal_worker_utilization_ratio{{{STUDY}}}", "{{study}}")],
            (12, 0, 12, 8),
            unit="percentunit",
            maximum=1,
            threshold=0.5,
        ),
        timeseries(
            "In-flight trials",
            "Trials submitted to Dask and not yet told to the optimizer.",
            [target("A", f"sum by (study) (simcal_inflight_trials{{{STUDY}}})", "{{study}}")],
            (0, 8, 8, 8),
        ),
        timeseries(
            "Workers vs minimum",
            "Connected Dask workers against the run's --min-workers (dashed). "
            "SimcalWorkersBelowMinimum fires after 5m below the minimum.",
            [
                target("A", f"max by (study) (simcal_workers{{{STUDY}}})", "{{study}} workers"),
                target(
                    "B", f"max by (study) (simcal_min_workers{{{STUDY}}})", "{{study}} minimum"
                ),
            ],
            (8, 8, 8, 8),
            overrides=[dashed("B", "red")],
        ),
        timeseries(
            "Trial errors by reason",
            "Failed trials per minute by reason (nan_loss, simulation_error, aggregation_error, "
            "timeout, worker_lost, cancelled).",
            [
                target(
                    "A",
                    f"sum by (study, reason) "
                    f"(rate(simcal_trial_errors_total{{{STUDY}}}[{rate}])) * 60",
                    "{{study}} {{reason}}",
                )
            ],
            (16, 8, 8, 8),
            unit="suffix: errors/min",
            stack=True,
        ),
        timeseries(
            "Trial duration p50 / p95",
            "Seconds from a trial's submission to its tell (histogram quantiles).",
            [
                target(
                    "A",
                    "histogram_quantile(0.5, sum by (study, le) "
                    f"(rate(simcal_trial_duration_seconds_bucket{{{STUDY}}}[{rate}])))",
                    "{{study}} p50",
                ),
                target(
                    "B",
                    "histogram_quantile(0.95, sum by (study, le) "
                    f"(rate(simcal_trial_duration_seconds_bucket{{{STUDY}}}[{rate}])))",
                    "{{study}} p95",
                ),
            ],
            (0, 16, 12, 8),
            unit="s",
        ),
        timeseries(
            "Best loss",
            "Best (lowest) loss found so far per study.",
            [target("A", f"simcal_best_loss{{{STUDY}}}", "{{study}}")],
            (12, 16, 12, 8),
            minimum=None,
        ),
        timeseries(
            "Dask scheduler tasks by state",
            "Tasks known to the Dask scheduler(s) by state (all scraped schedulers). Results "
            "piling up in `memory` mean the driver does not collect them; `queued` or "
            "`no-worker` mean too few workers.",
            [target("A", "sum by (state) (dask_scheduler_tasks)", "{{state}}")],
            (0, 24, 12, 8),
            stack=True,
        ),
        timeseries(
            "Trial error ratio",
            "Failed / told trials over 10m (simcal:trial_error_ratio:rate10m). "
            "SimcalHighErrorRate fires above 10% with at least 20 trials told in 10m.",
            [target("A", f"simcal:trial_error_ratio:rate10m{{{STUDY}}}", "{{study}}")],
            (12, 24, 12, 8),
            unit="percentunit",
            maximum=1,
            threshold=0.1,
        ),
        timeseries(
            "Driver busy",
            "Share of wall time each driver loop works (ask, tell, submit, bookkeeping) rather "
            "than waits for results, trailing window; the study's average (dashed) is what "
            "SimcalDriverSaturated uses: above 0.9 for 10m while utilization is below 0.7.",
            [
                target("A", f"simcal_driver_busy_ratio{{{STUDY}}}", "{{study}} {{instance}}"),
                target(
                    "B",
                    f"avg by (study) (simcal_driver_busy_ratio{{{STUDY}}})",
                    "{{study}} average",
                ),
            ],
            (0, 32, 12, 8),
            unit="percentunit",
            maximum=1,
            threshold=0.9,
            overrides=[dashed("B")],
        ),
        timeseries(
            "Storage time per operation",
            "p50 and p95 seconds of the drivers' storage operations (ask, tell, other: budget "
            "counts and recovery), all drivers of the study together.",
            [
                target(
                    "A",
                    "histogram_quantile(0.5, sum by (study, operation, le) "
                    f"(rate(simcal_storage_seconds_bucket{{{STUDY}}}[{rate}])))",
                    "{{study}} {{operation}} p50",
                ),
                target(
                    "B",
                    "histogram_quantile(0.95, sum by (study, operation, le) "
                    f"(rate(simcal_storage_seconds_bucket{{{STUDY}}}[{rate}])))",
                    "{{study}} {{operation}} p95",
                ),
            ],
            (12, 32, 12, 8),
            unit="s",
        ),
    ]
    for number, panel in enumerate(items, start=1):
        panel["id"] = number
    return items


def templating() -> dict[str, Any]:
    study_query = "label_values(simcal_trials_total, study)"
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "regex": "",
                "current": {},
                "hide": 0,
                "includeAll": False,
                "multi": False,
                "options": [],
                "refresh": 1,
                "skipUrlSync": False,
            },
            {
                "name": "study",
                "label": "Study",
                "type": "query",
                "datasource": DATASOURCE,
                "definition": study_query,
                "query": {"query": study_query, "refId": "StandardVariableQuery"},
                "regex": "",
                "current": {},
                "hide": 0,
                "includeAll": True,
                "allValue": ".*",
                "multi": True,
                "options": [],
                "refresh": 2,
                "sort": 1,
                "skipUrlSync": False,
            },
        ]
    }


def build_dashboard() -> dict[str, Any]:
    return {
        "id": None,
        "uid": "simcal-overview",
        "title": "simcal calibration",
        "description": "simcal calibration runs: throughput against the regression alert, "
        "workers, errors, trial durations, best loss and the Dask scheduler. "
        "Alerts and runbook: helm/simcal/files/prometheus-rules.yaml, docs/runbook.md.",
        "tags": ["simcal", "dask", "optuna"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "title": "Runbook",
                "type": "link",
                "url": "https://github.com/simcal/simcal/blob/main/docs/runbook.md",
                "targetBlank": True,
                "icon": "doc",
                "tooltip": "What each simcal alert means and what to do",
            }
        ],
        "templating": templating(),
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(build_dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python scripts/make_dashboard.py",
                  file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
