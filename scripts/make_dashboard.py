#!/usr/bin/env python3
"""Generate helm/simcal/files/grafana-dashboard.json, the "simcal calibration" dashboard.

Built with Grafana's own builders, the grafana-foundation-sdk package, which the project's
``test`` extra installs (``pip install -c constraints.txt -e '.[test]'``, or any make target
that needs the test extra). Edit this script, not the JSON, then run it from that virtualenv:

    .venv/bin/python scripts/make_dashboard.py           # rewrite the JSON (or: make dashboard)
    .venv/bin/python scripts/make_dashboard.py --check   # exit 1 if the JSON is out of date

Panel titles, the dashboard's uid and title and the variables' names are contracts: the
alert descriptions in helm/simcal/files/prometheus-rules.yaml and docs/runbook.md name them.
The regression threshold drawn on "Trials per minute" is 0.7 x
simcal:trials_per_minute:baseline3h, the same expression SimcalThroughputRegression uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from grafana_foundation_sdk.builders import common as common_builders
    from grafana_foundation_sdk.builders import dashboard as dashboard_builders
    from grafana_foundation_sdk.builders import prometheus, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as models
    from grafana_foundation_sdk.models.prometheus import QueryEditorMode
except ImportError as error:  # exit 2, not --check's 1: the JSON may well be current
    print(
        f"{error}: grafana-foundation-sdk is missing; run this script with the project's "
        "virtualenv after `pip install -c constraints.txt -e '.[test]'` (make dashboard does)",
        file=sys.stderr,
    )
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "helm" / "simcal" / "files" / "grafana-dashboard.json"
# As before the SDK (tests want >= 39); its Dashboard defaults to 36 and has no builder for it.
SCHEMA_VERSION = 39
DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
STUDY = 'study=~"$study"'


def target(ref: str, expr: str, legend: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .datasource(DATASOURCE)
        .ref_id(ref)
        .expr(expr)
        .legend_format(legend)
        .range()
        .editor_mode(QueryEditorMode.CODE)
    )


def dashed_line(color: str | None) -> list[models.DynamicConfigValue]:
    """Override properties: a dashed line (thresholds, minimums), in ``color`` if given."""
    style = common_builders.LineStyle().fill("dash").dash([10, 10]).build()
    properties = [models.DynamicConfigValue(id_val="custom.lineStyle", value=style)]
    if color:
        fixed = dashboard_builders.FieldColor().mode(models.FieldColorModeId.FIXED)
        properties.append(
            models.DynamicConfigValue(id_val="color", value=fixed.fixed_color(color).build())
        )
    return properties


def timeseries_panel(
    title: str,
    description: str,
    targets: list[prometheus.Dataquery],
    grid: tuple[int, int, int, int],
    *,
    unit: str = "short",
    minimum: float | None = 0,
    maximum: float | None = None,
    threshold: float | None = None,
    dashed: str | None = None,
    dashed_color: str | None = None,
    stack: bool = False,
) -> timeseries.Panel:
    """A line chart; ``dashed`` is the refId of a query drawn dashed (a threshold line)."""
    x, y, w, h = grid
    steps = [models.Threshold(value=None, color="green")]
    if threshold is not None:
        steps.append(models.Threshold(value=threshold, color="red"))
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .grid_pos(models.GridPos(x=x, y=y, w=w, h=h))
        .targets(targets)
        .unit(unit)
        .color_scheme(dashboard_builders.FieldColor().mode(models.FieldColorModeId.PALETTE_CLASSIC))
        .draw_style(common.GraphDrawStyle.LINE)
        .line_width(2)
        .fill_opacity(20 if stack else 0)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
        .stacking(
            common_builders.StackingConfig()
            .mode(common.StackingMode.NORMAL if stack else common.StackingMode.NONE)
            .group("A")
        )
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphTresholdsStyleMode.OFF
                if threshold is None
                else common.GraphTresholdsStyleMode.LINE_AND_AREA
            )
        )
        .thresholds(
            dashboard_builders.ThresholdsConfig().mode(models.ThresholdsMode.ABSOLUTE).steps(steps)
        )
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs([])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    if minimum is not None:
        panel.min(minimum)
    if maximum is not None:
        panel.max(maximum)
    if dashed is not None:
        panel.override_by_query(dashed, dashed_line(dashed_color))
    return panel


def panels() -> list[timeseries.Panel]:
    rate = "$__rate_interval"
    return [
        timeseries_panel(
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
            dashed="B",
            dashed_color="red",
        ),
        timeseries_panel(
            "Worker utilization",
            "Busy task-seconds / (worker threads x wall time), trailing window. "
            "SimcalLowWorkerUtilization fires below 0.5 for 15m with trials in flight.",
            [target("A", f"simcal_worker_utilization_ratio{{{STUDY}}}", "{{study}}")],
            (12, 0, 12, 8),
            unit="percentunit",
            maximum=1,
            threshold=0.5,
        ),
        timeseries_panel(
            "In-flight trials",
            "Trials submitted to Dask and not yet told to the optimizer.",
            [target("A", f"sum by (study) (simcal_inflight_trials{{{STUDY}}})", "{{study}}")],
            (0, 8, 8, 8),
        ),
        timeseries_panel(
            "Workers vs minimum",
            "Connected Dask workers against the run's --min-workers (dashed). "
            "SimcalWorkersBelowMinimum fires after 5m below the minimum.",
            [
                target("A", f"max by (study) (simcal_workers{{{STUDY}}})", "{{study}} workers"),
                target("B", f"max by (study) (simcal_min_workers{{{STUDY}}})", "{{study}} minimum"),
            ],
            (8, 8, 8, 8),
            dashed="B",
            dashed_color="red",
        ),
        timeseries_panel(
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
        timeseries_panel(
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
        timeseries_panel(
            "Best loss",
            "Best (lowest) loss found so far per study.",
            [target("A", f"simcal_best_loss{{{STUDY}}}", "{{study}}")],
            (12, 16, 12, 8),
            minimum=None,
        ),
        timeseries_panel(
            "Dask scheduler tasks by state",
            "Tasks known to the Dask scheduler(s) by state (all scraped schedulers). Results "
            "piling up in `memory` mean the driver does not collect them; `queued` or "
            "`no-worker` mean too few workers.",
            [target("A", "sum by (state) (dask_scheduler_tasks)", "{{state}}")],
            (0, 24, 12, 8),
            stack=True,
        ),
        timeseries_panel(
            "Trial error ratio",
            "Failed / told trials over 10m (simcal:trial_error_ratio:rate10m). "
            "SimcalHighErrorRate fires above 10% with at least 20 trials told in 10m.",
            [target("A", f"simcal:trial_error_ratio:rate10m{{{STUDY}}}", "{{study}}")],
            (12, 24, 12, 8),
            unit="percentunit",
            maximum=1,
            threshold=0.1,
        ),
        timeseries_panel(
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
            dashed="B",
        ),
        timeseries_panel(
            "Storage time per operation",
            "p50 and p95 seconds of the drivers' storage operations (ask; tell: one group commit "
            "per batch of results; other: budget counts and recovery), all drivers of the study "
            "together.",
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


def variables() -> list[dashboard_builders.DatasourceVariable | dashboard_builders.QueryVariable]:
    # Each variable's id is its name, as Grafana itself keys them: the SDK's default id (the
    # nil UUID, the same for every variable) would make them collide in Grafana's variable state.
    study_query = "label_values(simcal_trials_total, study)"
    return [
        dashboard_builders.DatasourceVariable("datasource")
        .id("datasource")
        .label("Data source")
        .type("prometheus")
        .regex(""),
        dashboard_builders.QueryVariable("study")
        .id("study")
        .label("Study")
        .datasource(DATASOURCE)
        .query({"query": study_query, "refId": "StandardVariableQuery"})
        .regex("")
        .include_all(True)
        .all_value(".*")
        .multi(True)
        .options([])
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC),
    ]


def position(panel: models.Panel) -> tuple[int, int, int, int]:
    return panel.grid_pos.x, panel.grid_pos.y, panel.grid_pos.w, panel.grid_pos.h


def build_dashboard() -> models.Dashboard:
    builder = (
        dashboard_builders.Dashboard("simcal calibration")
        .uid("simcal-overview")
        .description(
            "simcal calibration runs: throughput against the regression alert, "
            "workers, errors, trial durations, best loss and the Dask scheduler. "
            "Alerts and runbook: helm/simcal/files/prometheus-rules.yaml, docs/runbook.md."
        )
        .tags(["simcal", "dask", "optuna"])
        .version(1)
        .editable()
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .fiscal_year_start_month(0)
        .live_now(False)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        # No annotation of our own: Grafana adds its built-in "Annotations & Alerts" to a
        # dashboard that has none marked builtIn, a field the SDK's AnnotationQuery lacks.
        .annotations([])
        .link(
            dashboard_builders.DashboardLink("Runbook")
            .type(models.DashboardLinkType.LINK)
            .url("https://github.com/simcal/simcal/blob/main/docs/runbook.md")
            .target_blank(True)
            .icon("doc")
            .tooltip("What each simcal alert means and what to do")
        )
        .variables(variables())
    )
    declared = {}
    for number, panel in enumerate(panels(), start=1):
        declared[number] = position(panel.id(number).build())
        builder.with_panel(panel)
    board = builder.build()
    board.schema_version = SCHEMA_VERSION
    # with_panel moves a panel placed at x=0, y=0 to its own layout cursor: keep every
    # panel where it was put.
    for panel in board.panels or []:
        if position(panel) != declared[panel.id_val]:
            raise RuntimeError(
                f"{panel.title!r} moved from {declared[panel.id_val]} to {position(panel)}"
            )
    return board


def render() -> str:
    return json.dumps(build_dashboard(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(
                f"{args.output} is out of date: run make dashboard "
                "(.venv/bin/python scripts/make_dashboard.py)",
                file=sys.stderr,
            )
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
