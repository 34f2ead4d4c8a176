"""A bench run as markdown (its tables), with the JSON document and PNG chart beside it."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Results = dict[str, Any]
Column = tuple[str, Callable[[dict[str, Any]], object]]


def _number(value: object) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A markdown table with one line per row."""
    lines = [
        "| " + " | ".join(title for title, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_number(cell(row)) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def _streaming_rate(results: Results, workers: int, duration: float) -> float | None:
    for row in results["throughput"]:
        if (row["workers"], row["duration"], row["mode"]) == (workers, duration, "streaming"):
            return row["replicate_tasks_per_second"]
    return None


def to_markdown(results: Results) -> str:
    """The whole run as markdown: targets, throughput, raw Dask, gather, optimizer cost."""
    meta = results["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    load_start = " ".join(f"{x:.2f}" for x in meta["load_average_start"])
    load_end = " ".join(f"{x:.2f}" for x in meta.get("load_average_end", ()))
    raw = [
        {**r, "streaming": _streaming_rate(results, r["workers"], r["duration"])}
        for r in results["raw_dask"]
    ]
    sections = [
        f"# simcal bench: {meta['settings']['name']} settings, {meta['started']}",
        f"`{meta['command']}`; throughput storage: {meta['storage']}; {meta['cpus']} CPUs; "
        f"load average at start {load_start}, at end {load_end}; {versions}; "
        f"{meta.get('elapsed_seconds', '?')} s in all.",
        "## Targets",
        markdown_table(
            results["targets"],
            [
                ("target", lambda r: r["target"]),
                ("threshold", lambda r: f"{r['comparison']} {r['threshold']:g}"),
                ("measured", lambda r: r["value"]),
                ("met", lambda r: r["met"]),
            ],
        ),
        "## Calibration throughput",
        markdown_table(
            results["throughput"],
            [
                ("W", lambda r: r["workers"]),
                ("d (s)", lambda r: r["duration"]),
                ("mode", lambda r: r["mode"]),
                ("trials/min", lambda r: r["trials_per_minute"]),
                ("ideal", lambda r: r["ideal_trials_per_minute"]),
                ("efficiency", lambda r: r["efficiency"]),
                ("driver CPU ms/trial", lambda r: r["driver_cpu_seconds_per_trial"] * 1000),
                ("trials", lambda r: r["completed"]),
            ],
        ),
        "## Live report cost (regenerated every 2 s in a run, against a run without it)",
        markdown_table(
            results.get("report_cost", []),
            [
                ("W", lambda r: r["workers"]),
                ("d (s)", lambda r: r["duration"]),
                ("reports", lambda r: r["reports"]),
                ("s/report", lambda r: r["seconds_per_report"]),
                ("share every 2 s", lambda r: r["share_at_bench_interval"]),
                ("share every 30 s", lambda r: r["share_at_default_interval"]),
                ("CPU s/report", lambda r: r["cpu_seconds_per_report"]),
                ("CPU share every 30 s", lambda r: r["cpu_share_at_default_interval"]),
                ("trials/min with", lambda r: r["trials_per_minute_with_report"]),
                ("trials/min without", lambda r: r["trials_per_minute_without_report"]),
                ("with / without", lambda r: r["throughput_ratio"]),
            ],
        ),
        "## Raw Dask baseline (replicate tasks, no optimizer)",
        markdown_table(
            raw,
            [
                ("W", lambda r: r["workers"]),
                ("d (s)", lambda r: r["duration"]),
                ("raw tasks/s", lambda r: r["tasks_per_second"]),
                ("ideal tasks/s", lambda r: r["ideal_tasks_per_second"]),
                ("simcal streaming tasks/s", lambda r: r["streaming"]),
                (
                    "simcal / raw",
                    lambda r: r["streaming"] / r["tasks_per_second"] if r["streaming"] else None,
                ),
            ],
        ),
        "## Gather cost per future (finished futures, 10% failed)",
        markdown_table(
            results["gather"],
            [
                ("N", lambda r: r["n"]),
                ("strategy", lambda r: r["strategy"]),
                ("us/future", lambda r: r["us_per_future"]),
                ("x simcal", lambda r: r["ratio_to_simcal"]),
            ],
        ),
        "## Optimizer cost (ask + tell per trial, 8 trials pending)",
        markdown_table(
            results["optimizer_cost"],
            [
                ("storage", lambda r: r["storage"]),
                ("sampler", lambda r: r["sampler"]),
                ("stored trials", lambda r: r["stored_trials"]),
                ("ask ms", lambda r: r["ask_ms"]),
                ("tell ms", lambda r: r["tell_ms"]),
                ("ask+tell ms", lambda r: r["ask_tell_ms"]),
            ],
        ),
    ]
    return "\n\n".join(sections) + "\n"


def _grouped_bars(axes: Any, groups: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(len(series), 1)
    for index, (label, values) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(positions, values, width, label=label)
    axes.set_xticks(range(len(groups)), groups)
    axes.legend(fontsize="small", ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))


def write_chart(results: Results, path: Path) -> None:
    """Efficiency by mode and grid point; gather cost per future by strategy (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(15, 6))
    points = list(dict.fromkeys((r["workers"], r["duration"]) for r in results["throughput"]))
    modes = list(dict.fromkeys(r["mode"] for r in results["throughput"]))
    efficiency = {
        (r["workers"], r["duration"], r["mode"]): r["efficiency"] for r in results["throughput"]
    }
    _grouped_bars(
        left,
        [f"W={w}\nd={d:g}s" for w, d in points],
        {m: [efficiency.get((w, d, m), 0.0) for w, d in points] for m in modes},
    )
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_ylabel("efficiency (achieved / ideal trials/min)")
    left.set_title("Calibration efficiency by mode and worker count")
    sizes = list(dict.fromkeys(r["n"] for r in results["gather"]))
    strategies = list(dict.fromkeys(r["strategy"] for r in results["gather"]))
    cost = {(r["n"], r["strategy"]): r["us_per_future"] for r in results["gather"]}
    _grouped_bars(
        right,
        [f"N={n}" for n in sizes],
        {s: [cost.get((n, s), 0.0) for n in sizes] for s in strategies},
    )
    right.set_yscale("log")
    right.set_ylabel("microseconds per future (median)")
    right.set_title("Gather cost per future by strategy")
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    pyplot.close(figure)


def write_outputs(results: Results, directory: Path) -> dict[str, Path]:
    """``bench-<time>.json``, ``.md`` and ``.png`` in ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = "bench-" + results["meta"]["started"].replace(":", "").replace("+0000", "")
    paths = {kind: directory / f"{stem}.{kind}" for kind in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(to_markdown(results), encoding="utf-8")
    write_chart(results, paths["png"])
    return paths
