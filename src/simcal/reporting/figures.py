"""The report's figures, drawn with matplotlib's object API
(Agg canvas, no pyplot state: safe in a background thread) from stored trials: fit, loss,
parameters, throughput. Each function returns PNG bytes, or raises :class:`NoFigure`
saying why it cannot be drawn."""

from __future__ import annotations

import io
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from simcal.config import BINOMIAL_LOSSES, CalibrationConfig, TargetSpec
from simcal.targets import Observed
from simcal.tasks import FIT_ATTR_PREFIX
from simcal.trials import FAIL_REASON, INTERRUPTED

DPI = 96
BEST_COLOUR = "#c0392b"
OTHER_COLOUR = "#2c3e50"
OBSERVED_COLOUR = "#111111"
REASON_COLOURS = {
    "nan_loss": "#8e44ad",
    "simulation_error": "#d35400",
    "aggregation_error": "#e67e22",
    "timeout": "#2980b9",
    "worker_lost": "#7f8c8d",
    "cancelled": "#95a5a6",
    "model_import": "#c0392b",
}
MAX_PAIR_PARAMETERS = 6
# Fixed margins instead of a layout engine: constrained layout draws each figure again to
# measure it, a third of the live report's cost (docs/performance.md).
MARGINS = {"left": 0.085, "right": 0.985, "bottom": 0.12, "top": 0.91, "hspace": 0.12}


def _left(failed: Sequence[FrozenTrial]) -> float:
    """Room for the failure rows' labels ("simulation_error (12)")."""
    labels = [len(str(t.user_attrs.get(FAIL_REASON, "unknown"))) + 5 for t in failed]
    return min(0.085 + 0.0075 * max(labels, default=0), 0.3)


class NoFigure(Exception):
    """A figure that cannot be drawn from what the study holds; the message says why."""


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)  # not bbox_inches="tight": another draw
    return buffer.getvalue()


def _style(ax: Axes) -> None:
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def completed_by_loss(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Completed trials with a finite loss, best first (ties by trial number)."""
    done = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]
    return sorted(done, key=lambda t: (t.value, t.number))


def failed_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Failed trials, not counting those a stopped driver interrupted (they were retried)."""
    return [
        t
        for t in trials
        if t.state == TrialState.FAIL and t.user_attrs.get(FAIL_REASON) != INTERRUPTED
    ]


def fit_summary(trial: FrozenTrial, target: str) -> Mapping[str, list[float]] | None:
    """The replicate summary the driver stored for ``target`` (None if it stored none)."""
    summary = trial.user_attrs.get(f"{FIT_ATTR_PREFIX}{target}")
    if isinstance(summary, Mapping) and {"x", "median", "q05", "q95"} <= summary.keys():
        return summary
    return None


@dataclass(frozen=True)
class FitScale:
    """How a target's fit figure shows observed and simulated values on one scale."""

    observed: np.ndarray  # flattened, on the figure's scale
    label: str  # the y-axis: what both are


def fit_scale(target: TargetSpec, observed: Observed) -> FitScale:
    """Observed values on the scale of the stored simulated summary (``fit_series``)."""
    values = np.ravel(observed.values).astype(np.float64)
    if target.loss in BINOMIAL_LOSSES and observed.n is not None:
        if target.simulated == "count" and target.n_output is None:
            return FitScale(values, f"{target.name}: count of n (observed x; model count)")
        model = "model count / its n" if target.simulated == "count" else "model probability"
        with np.errstate(divide="ignore", invalid="ignore"):
            share = values / np.ravel(observed.n)
        return FitScale(share, f"{target.name}: proportion (observed x / n; {model})")
    if target.loss in ("poisson_nll", "negative_binomial_nll"):
        return FitScale(values, f"{target.name}: count (model: expected count)")
    return FitScale(values, target.name)


def _days(values: Sequence[float] | np.ndarray, start_date: str | None) -> np.ndarray:
    """Times in days as numbers, or as dates (``datetime64[s]``) counted from ``start_date``."""
    days = np.asarray(values, dtype=np.float64)
    if start_date is None:
        return days
    seconds = np.round(days * 86400).astype("int64").astype("timedelta64[s]")
    return np.datetime64(start_date, "s") + seconds


def fit_figure(
    target: TargetSpec, observed: Observed, ranked: Sequence[FrozenTrial], top: int
) -> bytes:
    """:func:`draw_fit` as PNG bytes."""
    return _png(draw_fit(target, observed, ranked, top))


def draw_fit(
    target: TargetSpec, observed: Observed, ranked: Sequence[FrozenTrial], top: int
) -> Figure:
    """Observed data against the best trial's replicate median and 5-95 % band, and the
    medians of the next best trials (faint)."""
    return fit_axes(target, observed, ranked, top).figure


def fit_axes(
    target: TargetSpec, observed: Observed, ranked: Sequence[FrozenTrial], top: int
) -> Axes:
    """The fit figure's axes (its lines and band can be read back, e.g. by tests).

    The x-axis is the data's time (``t``, or dates from ``start_date``) when it has times,
    the observed points at their times and the model's summary at the model's times; data
    without times is compared point by point, so both are drawn by position in the output.
    Binomial-family data is shown as the proportion x / n against the simulated
    probability, or as counts when the model gives a count of the data's own n.
    """
    name = target.name
    if not ranked:
        raise NoFigure("no trial completed, so there is no fit to show")
    best = ranked[0]
    summary = fit_summary(best, name)
    if summary is None:
        raise NoFigure(
            f"the best trial (#{best.number}) has no stored replicate summary for {name!r}: "
            "the study was run by a simcal that did not store them"
        )
    scale = fit_scale(target, observed)
    timed = observed.times is not None and "t" in summary
    start = target.start_date if timed else None

    def model_x(stored: Mapping[str, list[float]]) -> np.ndarray:
        return _days(stored["t"], start) if timed and "t" in stored else np.asarray(stored["x"])

    figure = Figure(figsize=(9, 4.2))
    ax = figure.subplots(gridspec_kw=MARGINS)
    others = 0
    for trial in ranked[1:top]:
        other = fit_summary(trial, name)
        if other is not None and (not timed or "t" in other):
            ax.plot(model_x(other), other["median"], color=OTHER_COLOUR, alpha=0.3,
                    linewidth=1, zorder=2,
                    label="next best trials (median)" if others == 0 else None)
            others += 1
    x = model_x(summary)
    low, high = np.asarray(summary["q05"]), np.asarray(summary["q95"])
    ax.fill_between(x, low, high, color=BEST_COLOUR, alpha=0.3, linewidth=0, zorder=1,
                    label="best trial: 5-95 % of replicates")
    for edge in (low, high):  # the band's edges: a band of zero width is still a line
        ax.plot(x, edge, color=BEST_COLOUR, alpha=0.7, linewidth=0.8, zorder=3)
    ax.plot(x, summary["median"], color=BEST_COLOUR, linewidth=1.4, zorder=4,
            label=f"best trial #{best.number}: median of replicates")
    if timed:
        assert observed.times is not None
        where = _days(observed.times, start)
        axis = "date" if start else "time t"
    else:
        where = np.arange(scale.observed.size)
        axis = "position in the output" + (
            " (the study stored no model times)" if observed.times is not None else "")
    ax.plot(where, scale.observed, "o", color=OBSERVED_COLOUR, markersize=6.5,
            markeredgecolor="white", markeredgewidth=0.8, zorder=5, label="observed")
    ax.set_xlabel(axis)
    ax.set_ylabel(scale.label)
    ax.set_title(f"{name}: observed data and the best fit (loss {best.value:.4g})")
    _style(ax)
    ax.legend(fontsize=9, framealpha=0.9, edgecolor="none")
    return ax


def _failure_rows(ax: Axes, failed: Sequence[FrozenTrial], x_of: object) -> None:
    by_reason: dict[str, list[float]] = defaultdict(list)
    for trial in failed:
        by_reason[str(trial.user_attrs.get(FAIL_REASON, "unknown"))].append(x_of(trial))
    reasons = sorted(by_reason)
    for row, reason in enumerate(reasons):
        ax.plot(by_reason[reason], [row] * len(by_reason[reason]), "x",
                color=REASON_COLOURS.get(reason, "#555555"), markersize=6)
    ax.set_yticks(range(len(reasons)), [f"{r} ({len(by_reason[r])})" for r in reasons])
    ax.set_ylim(-0.7, len(reasons) - 0.3)
    ax.set_ylabel("failed")
    _style(ax)


def loss_figure(trials: Sequence[FrozenTrial]) -> bytes:
    """Loss by trial number, the best loss so far, and failures by reason beneath."""
    ranked = completed_by_loss(trials)
    failed = failed_trials(trials)
    if not ranked and not failed:
        raise NoFigure("the study has no finished trial")
    rows = 2 if failed else 1
    figure = Figure(figsize=(9, 4.6 if failed else 3.8))
    axes = figure.subplots(
        rows, 1, sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": [3, 1][:rows], **MARGINS, "left": _left(failed)},
    )
    ax = axes[0][0]
    if ranked:
        ordered = sorted(ranked, key=lambda t: t.number)
        numbers = [t.number for t in ordered]
        losses = np.array([t.value for t in ordered])
        ax.plot(numbers, losses, "o", color=OTHER_COLOUR, alpha=0.45, markersize=3.5,
                label="completed trial")
        ax.step(numbers, np.minimum.accumulate(losses), where="post", color=BEST_COLOUR,
                linewidth=2, label="best so far")
        best = ranked[0]
        ax.plot([best.number], [best.value], "*", color=BEST_COLOUR, markersize=14,
                label=f"best: #{best.number}")
        if losses.min() > 0 and losses.max() / losses.min() > 100:
            ax.set_yscale("log")
        ax.legend(fontsize=9, framealpha=0.9, edgecolor="none")
    else:
        ax.text(0.5, 0.5, "no trial completed", ha="center", va="center",
                transform=ax.transAxes, fontsize=13, color=BEST_COLOUR)
        ax.set_yticks([])
    ax.set_ylabel("loss")
    ax.set_title("Loss by trial")
    _style(ax)
    if failed:
        _failure_rows(axes[1][0], failed, lambda t: t.number)
    axes[-1][0].set_xlabel("trial number")
    return _png(figure)


def parameters_figure(config: CalibrationConfig, trials: Sequence[FrozenTrial]) -> bytes:
    """Each parameter against loss (search bounds as the x range), then pairs coloured by loss."""
    ranked = completed_by_loss(trials)
    if not ranked:
        raise NoFigure("no trial completed, so there are no losses to plot parameters against")
    names = list(config.parameters)
    losses = np.array([t.value for t in ranked])
    shown = losses - losses.min() + 1e-12 if losses.min() <= 0 else losses
    colour = np.log10(shown) if shown.max() / shown.min() > 100 else shown
    pairs = names[:MAX_PAIR_PARAMETERS] if len(names) > 1 else []
    n = len(names)
    grid_rows = 1 + max(len(pairs) - 1, 0)
    cols = max(n, len(pairs) - 1, 1)
    width, height = 3.2 * cols + 1.2, 2.9 * grid_rows + 0.5
    figure = Figure(figsize=(width, height))
    grid = figure.add_gridspec(
        grid_rows, cols, left=0.75 / width, right=1 - 1.25 / width, bottom=0.5 / height,
        top=1 - 0.45 / height, wspace=0.3, hspace=0.42,
    )
    best = ranked[0]

    def values(name: str) -> np.ndarray:
        return np.array([t.params.get(name, np.nan) for t in ranked])

    def bounds(ax: Axes, name: str, axis: str) -> None:
        spec = config.parameters[name]
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log" if spec.log else "linear")
        span = (spec.high - spec.low) * 0.03
        low, high = (spec.low, spec.high) if spec.log else (spec.low - span, spec.high + span)
        (ax.set_xlim if axis == "x" else ax.set_ylim)(low, high)
        line = ax.axvline if axis == "x" else ax.axhline
        for edge in (spec.low, spec.high):
            line(edge, color="#999999", linestyle="--", linewidth=0.8)

    scatter = None
    for column, name in enumerate(names):
        ax = figure.add_subplot(grid[0, column])
        ax.scatter(values(name), losses, c=colour, cmap="viridis_r", s=12, alpha=0.8)
        ax.plot([best.params.get(name)], [best.value], "*", color=BEST_COLOUR, markersize=13)
        bounds(ax, name, "x")
        if losses.min() > 0 and losses.max() / losses.min() > 100:
            ax.set_yscale("log")
        ax.set_xlabel(name)
        if column == 0:
            ax.set_ylabel("loss")
        _style(ax)
    for row in range(1, len(pairs)):
        for column in range(row):
            ax = figure.add_subplot(grid[row, column])
            x_name, y_name = pairs[column], pairs[row]
            scatter = ax.scatter(values(x_name), values(y_name), c=colour, cmap="viridis_r",
                                 s=12, alpha=0.85)
            ax.plot([best.params.get(x_name)], [best.params.get(y_name)], "*",
                    color=BEST_COLOUR, markersize=13)
            bounds(ax, x_name, "x")
            bounds(ax, y_name, "y")
            ax.set_xlabel(x_name)
            ax.set_ylabel(y_name)
            _style(ax)
    if scatter is not None:
        label = "log10 loss" if colour is not losses and shown.max() / shown.min() > 100 else "loss"
        bar = figure.add_axes((1 - 0.85 / width, 0.2, 0.15 / width, 0.6))
        figure.colorbar(scatter, cax=bar, label=f"{label} (lower is better)")
    figure.suptitle("Parameters against loss (dashed: search bounds, star: best trial)")
    return _png(figure)


def throughput_figure(trials: Sequence[FrozenTrial]) -> bytes:
    """Completed trials per minute over the run's wall time, and failures per bin by reason."""
    counted = {t.number for t in completed_by_loss(trials) + failed_trials(trials)}
    finished = [t for t in trials if t.number in counted and t.datetime_complete is not None]
    if not finished:
        raise NoFigure("no trial has a completion time")
    start = min(t.datetime_start or t.datetime_complete for t in finished)

    def minutes(moment: datetime) -> float:
        return (moment - start).total_seconds() / 60

    span = max(minutes(max(t.datetime_complete for t in finished)), 1e-3)
    bins = int(np.clip(span * 60 / 2, 1, 40))  # at most 40 bins, each at least 2 s long
    edges = np.linspace(0, span, bins + 1)
    width = edges[1] - edges[0]
    done = [minutes(t.datetime_complete) for t in finished if t.state == TrialState.COMPLETE]
    counts, _ = np.histogram(done, bins=edges)
    failed = [t for t in finished if t.state == TrialState.FAIL]
    rows = 2 if failed else 1
    figure = Figure(figsize=(9, 4.4 if failed else 3.4))
    axes = figure.subplots(
        rows, 1, sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": [3, 1.3][:rows], **MARGINS},
    )
    ax = axes[0][0]
    if done:
        ax.stairs(counts / width, edges, color=OTHER_COLOUR, linewidth=1.8, fill=True,
                  alpha=0.25)
        ax.stairs(counts / width, edges, color=OTHER_COLOUR, linewidth=1.8)
        mean = len(done) / span
        ax.axhline(mean, color=BEST_COLOUR, linestyle="--", linewidth=1,
                   label=f"mean {mean:.1f} trials/min")
        ax.legend(frameon=False, fontsize=9)
    else:
        ax.text(0.5, 0.5, "no trial completed", ha="center", va="center",
                transform=ax.transAxes, fontsize=13, color=BEST_COLOUR)
        ax.set_yticks([])
    ax.set_ylabel("completed trials / min")
    ax.set_title(f"Throughput ({width * 60:.3g} s bins)")
    _style(ax)
    if failed:
        bottom = np.zeros(bins)
        counter = Counter(str(t.user_attrs.get(FAIL_REASON, "unknown")) for t in failed)
        for reason in sorted(counter):
            times = [minutes(t.datetime_complete) for t in failed
                     if str(t.user_attrs.get(FAIL_REASON, "unknown")) == reason]
            per_bin, _ = np.histogram(times, bins=edges)
            axes[1][0].bar(edges[:-1], per_bin, width=width, bottom=bottom, align="edge",
                           color=REASON_COLOURS.get(reason, "#555555"),
                           label=f"{reason} ({counter[reason]})")
            bottom += per_bin
        axes[1][0].set_ylabel("failed trials")
        axes[1][0].legend(fontsize=8, loc="upper left", framealpha=0.9, edgecolor="none")
        _style(axes[1][0])
    axes[-1][0].set_xlabel("wall time since the first trial started (minutes)")
    return _png(figure)
