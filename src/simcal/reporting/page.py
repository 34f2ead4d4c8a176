"""``report.html``: one self-contained offline page (figures as data URIs, inline CSS, no
script) with the fit, loss, parameters and throughput figures, the best trials, the
summary, the config and the versions; the PNGs are also written beside it."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from simcal.config import CalibrationConfig
from simcal.progress import trials_per_minute
from simcal.reporting import figures
from simcal.storage import redact
from simcal.targets import load_target_data
from simcal.trials import FAIL_REASON, INTERRUPTED

REPORT_FILE = "report.html"
VERSIONED = ("simcal", "optuna", "dask", "distributed", "numpy", "matplotlib")


@dataclass(frozen=True)
class Section:
    """An extra section of the page (a hook for later additions, e.g. posterior intervals)."""

    title: str
    html: str


@dataclass(frozen=True)
class Figure:
    """One figure of the page: its file name and PNG, or why it is missing."""

    file: str
    title: str
    caption: str
    png: bytes | None = None
    missing: str | None = None


FigureCache = dict[str, tuple[object, Figure]]


def _draw(
    file: str,
    title: str,
    caption: str,
    draw: Callable[[], bytes],
    cache: FigureCache | None = None,
    key: object = None,
) -> Figure:
    """Draw a figure, or reuse the cached one if what it shows (``key``) did not change."""
    if cache is not None and file in cache and cache[file][0] == key:
        return cache[file][1]
    try:
        figure = Figure(file, title, caption, png=draw())
    except figures.NoFigure as exc:
        figure = Figure(file, title, caption, missing=str(exc))
    if cache is not None:
        cache[file] = (key, figure)
    return figure




def build_figures(
    config: CalibrationConfig,
    trials: Sequence[FrozenTrial],
    top: int,
    cache: FigureCache | None = None,
) -> list[Figure]:
    """Every figure of the report, drawn from the stored trials.

    With a ``cache`` (the live report keeps one), a figure whose inputs did not change is
    not drawn again: finished trials never change, so counts of them identify what is shown.
    """
    ranked = figures.completed_by_loss(trials)
    failed = len(figures.failed_trials(trials))
    best = tuple(t.number for t in ranked[:top])
    result = []
    for target in config.targets:
        result.append(
            _draw(
                f"fit-{target.name}.png",
                f"Fit: {target.name}",
                "Observed data (dots, at their times when the data has times) against the "
                "best trial's replicates: their median (line) and 5-95 % range (band), as "
                "the workers computed them during the run; faint lines: medians of the next "
                f"{max(top - 1, 0)} best trials. The y-axis says what is compared (binomial "
                "data: the proportion x / n against the model's probability, or counts).",
                lambda target=target: figures.fit_figure(
                    target, load_target_data(target), ranked, top
                ),
                cache,
                best,
            )
        )
    result.append(
        _draw("loss.png", "Loss by trial",
              "Each completed trial's loss, the best loss so far, and failed trials by reason.",
              lambda: figures.loss_figure(trials), cache, (len(ranked), failed))
    )
    result.append(
        _draw("parameters.png", "Parameters",
              "Each parameter against the loss within its search bounds, and each pair of "
              "parameters coloured by loss (yellow: lower loss, better).",
              lambda: figures.parameters_figure(config, trials), cache, len(ranked))
    )
    result.append(
        _draw("throughput.png", "Throughput",
              "Completed trials per minute over the run's wall time (from the stored start and "
              "completion times), and failed trials by reason.",
              lambda: figures.throughput_figure(trials), cache, (len(ranked), failed))
    )
    return result


def study_summary(study: optuna.Study, trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    """Counts, best trial and throughput of the whole study, from storage alone."""
    ranked = figures.completed_by_loss(trials)
    failed = figures.failed_trials(trials)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    times = [t.datetime_complete for t in completed + failed if t.datetime_complete]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    wall = (max(times) - min(starts)).total_seconds() if times and starts else 0.0
    best = ranked[0] if ranked else None
    return {
        "study": study.study_name,
        "n_trials": len(completed) + len(failed),
        "n_completed": len(completed),
        "n_failed": len(failed),
        "n_interrupted": sum(1 for t in trials if t.user_attrs.get(FAIL_REASON) == INTERRUPTED),
        "n_running": sum(1 for t in trials if t.state == TrialState.RUNNING),
        "best_trial": best.number if best else None,
        "best_loss": best.value if best else None,
        "best_params": best.params if best else None,
        "errors": dict(Counter(str(t.user_attrs.get(FAIL_REASON, "unknown")) for t in failed)),
        "wall_seconds": round(wall, 3),
        "trials_per_minute": round(trials_per_minute(len(completed), wall), 3),
    }


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"num" if isinstance(v, int | float) else "text"}">'
            f"{html.escape(_format(v))}</td>"
            for v in row
        )
        + "</tr>"
        for row in rows
    )
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def best_table(config: CalibrationConfig, trials: Sequence[FrozenTrial], top: int) -> str:
    """The best ``top`` trials, columns in config order: loss per target, then parameters."""
    ranked = figures.completed_by_loss(trials)[:top]
    targets = [t.name for t in config.targets]
    params = list(config.parameters)
    columns = ["rank", "trial", "loss", *[f"loss {t}" for t in targets], *params, "seconds"]
    rows = [
        [rank, t.number, t.value, *[t.user_attrs.get(f"loss_{n}") for n in targets],
         *[t.params.get(p) for p in params], t.user_attrs.get("duration_seconds")]
        for rank, t in enumerate(ranked, 1)
    ]
    return _table(columns, rows, "best")


def _status(
    config: CalibrationConfig, summary: dict[str, Any], trials: Sequence[FrozenTrial]
) -> str:
    """The page's headline: how the study went, in words."""
    if summary["n_trials"] == 0:
        running = summary["n_running"]
        return (f'<p class="warn">No trial has finished yet ({running} running). '
                "The figures appear once trials complete.</p>")
    if summary["n_completed"] == 0:
        failed = figures.failed_trials(trials)
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(summary["errors"].items()))
        first = html.escape(str(failed[0].user_attrs.get("error", "no message stored")))
        return (f'<p class="bad">All {summary["n_failed"]} finished trials failed '
                f"({html.escape(reasons)}), so there is no fit to show. "
                f"The first error: <code>{first}</code></p>")
    text = (f'<p class="good">Best loss <b>{summary["best_loss"]:.6g}</b> at trial '
            f'#{summary["best_trial"]}: '
            + ", ".join(f"{html.escape(k)} = {v:.6g}" for k, v in summary["best_params"].items())
            + f'. {summary["n_completed"]} of {summary["n_trials"]} trials completed')
    if summary["n_failed"]:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(summary["errors"].items()))
        text += f'; {summary["n_failed"]} failed ({html.escape(reasons)})'
    text += ".</p>"
    edges = at_bounds(config, summary["best_params"])
    if edges:
        text += (f'<p class="warn">At the edge of the search range (within 2 %): best '
                 f'{html.escape(", ".join(edges))}. The optimum may lie outside the range; '
                 "consider widening it.</p>")
    return text


def at_bounds(config: CalibrationConfig, params: dict[str, float]) -> list[str]:
    """The parameters whose best value lies within 2 % of the range from a search bound."""
    near = []
    for name, spec in config.parameters.items():
        if name not in params:
            continue
        low, high, value = spec.low, spec.high, params[name]
        if spec.log:
            low, high, value = np.log(low), np.log(high), np.log(value)
        side = "lower" if value - low <= 0.02 * (high - low) else None
        side = "upper" if high - value <= 0.02 * (high - low) else side
        if side:
            near.append(f"{name} is at its {side} bound")
    return near


def _errors_table(trials: Sequence[FrozenTrial]) -> str:
    failed = figures.failed_trials(trials)
    if not failed:
        return ""
    first: dict[str, FrozenTrial] = {}
    counts: Counter[str] = Counter()
    for trial in failed:
        reason = str(trial.user_attrs.get(FAIL_REASON, "unknown"))
        counts[reason] += 1
        first.setdefault(reason, trial)
    rows = [[r, counts[r], first[r].number, first[r].user_attrs.get("error", "")]
            for r in sorted(counts)]
    return "<h2>Failures</h2>" + _table(["reason", "trials", "first trial", "its error"], rows)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0 auto;max-width:1100px;padding:1.5em 2em;color:#222;line-height:1.45}
h1{margin-bottom:.1em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.best tbody tr:first-child{background:#fdecea;font-weight:600}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
.missing{background:#fff8e1;border:1px solid #f0d68a;padding:.6em 1em}
.good{font-size:1.1em}.warn{background:#fff8e1;padding:.6em 1em}
.bad{background:#fdecea;padding:.6em 1em;font-size:1.05em}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
nav a{margin-right:1em}
"""


def render_page(
    config: CalibrationConfig,
    summary: dict[str, Any],
    trials: Sequence[FrozenTrial],
    drawn: Sequence[Figure],
    top: int,
    storage_url: str,
    sections: Sequence[Section] = (),
) -> str:
    """The HTML text of the report."""
    config_text = config.model_dump(mode="json")
    config_text["storage"] = redact(storage_url)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>simcal report: {html.escape(config.study)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Calibration report: {html.escape(config.study)}</h1>",
        f'<p class="sub">model <code>{html.escape(config.model_label)}</code> · storage '
        f"<code>{html.escape(redact(storage_url))}</code> · generated "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}</p>",
        _status(config, summary, trials),
    ]
    for figure in drawn:
        parts.append(f"<h2>{html.escape(figure.title)}</h2>")
        if figure.png is None:
            parts.append(f'<p class="missing">Not shown: {html.escape(figure.missing or "")}</p>')
            continue
        data = base64.b64encode(figure.png).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(figure.title)}">'
            f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>"
        )
    if figures.completed_by_loss(trials):
        parts.append(f"<h2>Best {top} trials</h2>")
        parts.append(best_table(config, trials, top))
    parts.append(_errors_table(trials))
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>{section.html}")
    parts += [
        "<h2>Summary</h2>",
        f"<pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre>",
        "<h2>Config</h2>",
        f"<pre>{html.escape(yaml.safe_dump(config_text, sort_keys=False))}</pre>",
        "<h2>Versions</h2>",
        _table(["package", "version"], sorted(_versions().items())),
        "</body></html>",
    ]
    return "\n".join(parts)


def _write(path: Path, data: bytes) -> None:
    """Write atomically, so a reader (e.g. the live view) never sees half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600; the report is for reading
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_report(
    study: optuna.Study,
    config: CalibrationConfig,
    out: Path,
    *,
    top: int,
    storage_url: str,
    sections: Sequence[Section] = (),
    cache: FigureCache | None = None,
) -> Path:
    """Draw the figures, write them and ``report.html`` into ``out``; returns the page's path."""
    trials = study.get_trials(deepcopy=False)
    summary = study_summary(study, trials)
    drawn = build_figures(config, trials, top, cache)
    out.mkdir(parents=True, exist_ok=True)
    for figure in drawn:
        stale = out / figure.file
        if figure.png is not None:
            _write(stale, figure.png)
        else:
            stale.unlink(missing_ok=True)
    page = render_page(config, summary, trials, drawn, top, storage_url, sections)
    target = out / REPORT_FILE
    _write(target, page.encode("utf-8"))
    return target
