"""Targets: a target's observed data (CSV or callable), its time alignment and its objective.

The CSV format (README, "Observed data"): UTF-8, comma-separated, a header row naming
every column; an optional time column ``t`` (numbers) or ``date`` (ISO dates, with the
target's ``start_date``); the value column named like the target (or the only other
column); an ``n`` column for binomial losses. Every row has every field; a blank line,
an empty field, a non-numeric or non-finite value is an error naming the file and line.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from simcal import likelihoods
from simcal.config import BUILTIN_LOSSES, COUNT_LIKELIHOODS, ParameterRef, TargetSpec
from simcal.failures import ModelOutputError, NonFiniteLossError, describe
from simcal.imports import resolve_callable
from simcal.tasks import resolve_on_worker

LossFunction = Callable[[np.ndarray, np.ndarray], float]
TIME_COLUMNS = ("t", "date")
TIME_KEY = "t"  # the model output key holding a replicate's times
N_COLUMN = "n"


class ObservedDataError(ValueError):
    """The observed data of a target is unusable; the message names the file and line."""


def mse(simulated: np.ndarray, observed: np.ndarray) -> float:
    """Mean squared error between the replicate mean and the observed data."""
    return likelihoods.mse(simulated.mean(axis=0), observed)


def poisson_nll(simulated: np.ndarray, observed: np.ndarray) -> float:
    """Poisson negative log-likelihood of the observed counts, rate = replicate mean."""
    return likelihoods.negative_log_likelihood("poisson_nll", simulated.mean(axis=0), observed)


BUILTIN: dict[str, LossFunction] = {"mse": mse, "poisson_nll": poisson_nll}


def loss_function(name: str) -> LossFunction:
    """A built-in loss by name (``mse``, ``poisson_nll``), or a ``module:callable``."""
    return BUILTIN.get(name) or resolve_callable(name)


# -- observed data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """A target's observed values, with their times, trials (``n``) and labels for messages."""

    values: np.ndarray
    times: np.ndarray | None = None  # days (a ``date`` column: days since ``start_date``)
    n: np.ndarray | None = None
    labels: tuple[str, ...] = ()  # per point: "file.csv line 3 (t=4)" or "index 3"


def _number(text: str, where: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ObservedDataError(f"{where}: column {column!r} is not numeric: {text!r}") from None
    if not math.isfinite(value):
        raise ObservedDataError(f"{where}: column {column!r} is not finite: {text!r}")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _value_column(header: list[str], target: TargetSpec, path: Path | str) -> str:
    if target.name in header:
        return target.name
    others = [c for c in header if c not in (*TIME_COLUMNS, N_COLUMN)]
    if len(others) == 1:
        return others[0]
    raise ObservedDataError(
        f"{path} line 1: no column named {target.name!r} and {len(others)} other value "
        f"columns {others}; name the value column like the target"
    )


def read_csv(path: Path, target: TargetSpec) -> Observed:
    """Read a target's CSV strictly (module docstring); errors name the file and line."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise ObservedDataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise ObservedDataError(f"{path}: empty file (a header row is required)")
            header = [cell.strip() for cell in header]
            if any(not cell for cell in header):
                raise ObservedDataError(f"{path} line 1: empty column name in header {header}")
            if any(_is_number(cell) for cell in header):
                raise ObservedDataError(
                    f"{path} line 1: header expected, found a number in {header} "
                    "(the first row must name the columns)"
                )
            if len(set(header)) != len(header):
                raise ObservedDataError(f"{path} line 1: duplicate column names in {header}")
            times = [c for c in header if c in TIME_COLUMNS]
            if len(times) > 1:
                raise ObservedDataError(f"{path} line 1: both 't' and 'date' columns; keep one")
            _value_column(header, target, path)  # before reading rows: the header's fault first
            rows: list[tuple[int, list[str]]] = []
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    raise ObservedDataError(
                        f"{path} line {line}: blank line (a missing value must not be left out)"
                    )
                if len(row) != len(header):
                    raise ObservedDataError(
                        f"{path} line {line}: {len(row)} fields, the header has {len(header)}"
                    )
                for column, cell in zip(header, row, strict=True):
                    if not cell.strip():
                        raise ObservedDataError(
                            f"{path} line {line}: missing value in column {column!r}"
                        )
                rows.append((line, [cell.strip() for cell in row]))
        except csv.Error as exc:
            raise ObservedDataError(f"{path} line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError:
            raise ObservedDataError(f"{path}: not UTF-8 text") from None
    if not rows:
        raise ObservedDataError(f"{path}: no data rows after the header")
    return _from_rows(header, rows, target, path)


def _from_rows(
    header: list[str],
    rows: list[tuple[int, list[str]]],
    target: TargetSpec,
    path: Path | str,
    row: str = "line",
) -> Observed:
    """Observed data from a header and its text rows (numbered: a file's lines, a table's
    rows); every rule of the CSV format applies, messages name ``path`` and the ``row``."""
    if len(set(header)) != len(header):
        raise ObservedDataError(f"{path}: duplicate column names in {header}")
    times = [c for c in header if c in TIME_COLUMNS]
    if len(times) > 1:
        raise ObservedDataError(f"{path}: both 't' and 'date' columns; keep one")
    value_column = _value_column(header, target, path)
    column = {name: index for index, name in enumerate(header)}

    def numbers(name: str) -> np.ndarray:
        return np.array([_number(r[column[name]], f"{path} {row} {ln}", name) for ln, r in rows])

    values = numbers(value_column)
    short = path.name if isinstance(path, Path) else path
    labels = [f"{short} {row} {line}" for line, _ in rows]
    time_values = None
    if times:
        name = times[0]
        dated = name == "date"
        time_values = _dates(rows, column[name], path, target, row) if dated else numbers(name)
        labels = [
            f"{label} ({name}={r[column[name]]})"
            for label, (_, r) in zip(labels, rows, strict=True)
        ]
        _check_increasing(time_values, labels)
    elif target.start_date is not None:
        raise ObservedDataError(f"{path}: start_date is set but there is no 'date' column")
    n = numbers(N_COLUMN) if N_COLUMN in column else None
    return Observed(values, time_values, n, tuple(labels))


def _from_inline(target: TargetSpec) -> Observed:
    """Observed data given in Python (a DataFrame, a mapping of columns, an array), read by
    the CSV format's rules: rows are numbered from 1 in messages."""
    assert not isinstance(target.observed, str)
    header = list(target.observed)
    columns = [target.observed[name] for name in header]
    size = len(columns[0])
    if size == 0:
        raise ObservedDataError(f"{target.observed_label}: no rows")
    rows = [(index + 1, [str(column[index]) for column in columns]) for index in range(size)]
    return _from_rows(header, rows, target, target.observed_label, row="row")


def _dates(
    rows: list[tuple[int, list[str]]],
    index: int,
    path: Path | str,
    target: TargetSpec,
    row_word: str = "line",
) -> Any:
    if target.start_date is None:
        raise ObservedDataError(
            f"{path}: a 'date' column needs the target's start_date (the date of model t=0)"
        )
    origin = date.fromisoformat(target.start_date)
    days = []
    for line, row in rows:
        try:
            days.append(float((date.fromisoformat(row[index]) - origin).days))
        except ValueError:
            raise ObservedDataError(
                f"{path} {row_word} {line}: column 'date' is not an ISO date: {row[index]!r}"
            ) from None
    return np.array(days)


def _check_increasing(times: np.ndarray, labels: Sequence[str]) -> None:
    steps = np.diff(times)
    if (steps <= 0).any():
        index = int(np.argmax(steps <= 0)) + 1
        raise ObservedDataError(f"{labels[index]}: times must increase strictly")


def _from_callable(target: TargetSpec) -> Observed:
    raw = resolve_callable(target.observed)()
    if not isinstance(raw, Mapping):
        values = np.asarray(raw, dtype=np.float64)
        return Observed(values, labels=tuple(f"index {i}" for i in range(values.shape[-1:][0])))
    key = target.name if target.name in raw else "value"
    if key not in raw:
        raise ObservedDataError(
            f"{target.observed}: returned keys {sorted(raw)}, none is {target.name!r} or 'value'"
        )
    values = np.asarray(raw[key], dtype=np.float64)
    times = np.asarray(raw[TIME_KEY], dtype=np.float64) if TIME_KEY in raw else None
    n = np.asarray(raw[N_COLUMN], dtype=np.float64) if N_COLUMN in raw else None
    labels = tuple(
        f"index {i}" + (f" (t={times[i]:g})" if times is not None else "")
        for i in range(values.shape[-1:][0] if values.ndim else 0)
    )
    if times is not None:
        if times.shape != values.shape or values.ndim != 1:
            raise ObservedDataError(f"{target.observed}: 't' and {key!r} differ in shape")
        _check_increasing(times, labels)
    return Observed(values, times, n, labels)


def _check_counts(target: TargetSpec, data: Observed) -> None:
    where = target.observed_label
    if target.loss in COUNT_LIKELIHOODS:
        bad = (data.values < 0) | (data.values != np.round(data.values))
        if bad.any():
            index = int(np.argmax(bad.ravel()))
            raise ObservedDataError(
                f"{where}: {target.loss} needs non-negative integer counts; "
                f"{_at(data, index)} has {data.values.ravel()[index]:g}"
            )
    if target.loss in likelihoods.PROBABILITY_LOSSES:
        if data.n is None:
            raise ObservedDataError(f"{where}: {target.loss} needs an 'n' column (trials)")
        bad = (data.n < data.values) | (data.n != np.round(data.n))
        if data.n.shape != data.values.shape:
            raise ObservedDataError(f"{where}: 'n' and the values differ in shape")
        if bad.any():
            index = int(np.argmax(bad.ravel()))
            raise ObservedDataError(
                f"{where}: 'n' must be an integer >= the count; {_at(data, index)} has "
                f"n={data.n.ravel()[index]:g}, count={data.values.ravel()[index]:g}"
            )


def _at(data: Observed, index: int) -> str:
    return data.labels[index] if index < len(data.labels) else f"index {index}"


def load_target_data(target: TargetSpec) -> Observed:
    """A target's observed data, read and checked against its loss (bad data: ObservedDataError)."""
    if target.observed_file is not None:
        data = read_csv(target.observed_file, target)
    elif target.observed_reference is not None:
        data = _from_callable(target)
    else:
        data = _from_inline(target)
    if data.values.size == 0 or not np.all(np.isfinite(data.values)):
        raise ObservedDataError(f"target {target.name!r}: observed data is empty or not finite")
    _check_counts(target, data)
    return data


def load_observed(target: TargetSpec) -> np.ndarray:
    """The observed values of a target (checked as :func:`load_target_data` does)."""
    return load_target_data(target).values


# -- alignment ----------------------------------------------------------------------------------


def align_indices(
    model_times: np.ndarray, observed: Observed, how: str, target: str
) -> np.ndarray:
    """For each observed time, the index of the model time it joins to (or an error naming it).

    ``exact``: the same time; ``nearest``: the closest model time within the model's range;
    ``asof``: the last model time at or before it.
    """
    assert observed.times is not None
    order = np.argsort(model_times, kind="stable")
    sorted_times = model_times[order]
    wanted = observed.times
    if how == "asof":
        position = np.searchsorted(sorted_times, wanted, side="right") - 1
        found = position >= 0
    else:
        position = np.clip(np.searchsorted(sorted_times, wanted), 0, len(sorted_times) - 1)
        if how == "nearest":
            left = np.clip(position - 1, 0, None)
            closer = np.abs(sorted_times[left] - wanted) <= np.abs(sorted_times[position] - wanted)
            position = np.where(closer, left, position)
            found = (wanted >= sorted_times[0]) & (wanted <= sorted_times[-1])
        else:
            found = np.abs(sorted_times[position] - wanted) <= 1e-9 * np.maximum(1, abs(wanted))
    if not found.all():
        index = int(np.argmin(found))
        raise ModelOutputError(
            f"target {target!r}: observation time {wanted[index]:g} ({_at(observed, index)}) "
            f"has no model time ({how}); model times run {sorted_times[0]:g} to "
            f"{sorted_times[-1]:g}"
        )
    return order[np.clip(position, 0, None)]


# -- the objective --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """One target's loss on a trial's replicates: aligns times, applies the loss, combines.

    Bound to a trial with :meth:`bind` when its dispersion or sd is a search parameter.
    Runs on Dask workers (``simcal.tasks.aggregate`` calls :meth:`evaluate`).
    """

    target: str
    output_key: str
    loss: str
    observed: Observed
    align: str = "exact"
    combine: str = "mean"
    custom: LossFunction | str | None = None  # a ``module:callable`` reference, or a function
    dispersion: float | ParameterRef | None = None
    sd: float | ParameterRef | None = None
    simulated: str = "probability"  # binomial family: "count" is a count of n, made x / n
    n_output: str | None = None  # the model output holding n (else the data's ``n``)

    def bind(self, params: Mapping[str, float]) -> Objective:
        """This objective with its calibrated loss parameters taken from ``params``."""
        resolved = {
            name: float(params[value.parameter])
            for name in ("dispersion", "sd")
            if isinstance(value := getattr(self, name), ParameterRef)
        }
        return replace(self, **resolved) if resolved else self

    def __call__(self, simulated: np.ndarray, observed: np.ndarray) -> float:
        """The old loss signature (stacked replicates, observed values), for direct callers."""
        stacked = np.asarray(simulated, dtype=np.float64)
        if self.counts:
            stacked = np.stack([self._probability(s, self.observed.n, "the data's 'n'")
                                for s in stacked])
        return self._loss(stacked)

    @property
    def counts(self) -> bool:
        """Whether the model gives a count of n (``simulated: count``), not a probability."""
        return self.simulated == "count"

    def evaluate(self, replicates: Sequence[Any]) -> float:
        """The loss of replicates (objects with ``.outputs``), aligned to the observed times."""
        stacked = np.stack([self._compared(r.outputs) for r in replicates])
        return self._loss(stacked)

    def _compared(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """One replicate as the loss compares it: aligned, a count turned into x / n."""
        values = self._aligned(outputs, self.output_key)
        if not self.counts:
            return values
        if self.n_output is None:
            return self._probability(values, self.observed.n, "the data's 'n'")
        n = self._aligned(outputs, self.n_output)
        return self._probability(values, n, f"model output {self.n_output!r}")

    def _probability(self, counts: np.ndarray, n: np.ndarray | None, source: str) -> np.ndarray:
        assert n is not None, "binomial data has an 'n' (checked when loaded)"
        return likelihoods.probability_of_counts(
            self.target, counts, n, list(self.observed.labels), source
        )

    def fit_series(
        self, outputs: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One replicate's whole output as the fit figure shows it, and its times (None for
        data without times): a count of the model's own ``n_output`` as the proportion x / n,
        anything else as the model returned it."""
        values = self._output(outputs, self.output_key)
        if self.counts and self.n_output is not None:
            n = self._output(outputs, self.n_output)
            if n.shape == values.shape:
                with np.errstate(divide="ignore", invalid="ignore"):
                    values = values / n
        if self.observed.times is None:
            return values, None
        times = outputs.get(TIME_KEY)
        if times is None:
            times = np.arange(values.shape[0], dtype=np.float64)  # t = 0, 1, 2, ...
        return values, times if times.shape == values.shape else None

    def _output(self, outputs: Mapping[str, np.ndarray], key: str) -> np.ndarray:
        if key in outputs:
            return outputs[key]
        if "" in outputs and key == self.output_key:
            return outputs[""]
        raise ModelOutputError(f"model output has no {key!r}; it has {sorted(outputs)}")

    def _aligned(self, outputs: Mapping[str, np.ndarray], key: str) -> np.ndarray:
        values = self._output(outputs, key)
        if self.observed.times is None:
            if values.shape != self.observed.values.shape:
                what = "model output" if key == self.output_key else f"model output {key!r}"
                raise ModelOutputError(
                    f"target {self.target!r}: {what} has shape {values.shape}, "
                    f"observed data has shape {self.observed.values.shape}"
                )
            return values
        times = outputs.get(TIME_KEY)
        if times is None:
            times = np.arange(values.shape[0], dtype=np.float64)  # t = 0, 1, 2, ...
        if values.ndim != 1 or times.shape != values.shape:
            raise ModelOutputError(
                f"target {self.target!r}: model output {key!r} has shape "
                f"{values.shape} and 't' has shape {times.shape}; both must be 1-D, equal"
            )
        return values[align_indices(times, self.observed, self.align, self.target)]

    def _loss(self, stacked: np.ndarray) -> float:
        if self.custom is not None:
            custom = resolve_on_worker(self.custom)
            if self.combine == "mean":
                return float(custom(stacked, self.observed.values))
            return likelihoods.combine(
                np.array([custom(s[None], self.observed.values) for s in stacked]),
                self.combine,
            )
        likelihoods.check_simulated(self.target, self.loss, stacked, list(self.observed.labels))
        if self.combine == "mean":
            return self._one(stacked.mean(axis=0))
        return likelihoods.combine(np.array([self._one(s) for s in stacked]), self.combine)

    def _one(self, simulated: np.ndarray) -> float:
        if self.loss == "mse":
            return likelihoods.mse(simulated, self.observed.values)
        assert not isinstance(self.dispersion, ParameterRef), "bind() the objective first"
        assert not isinstance(self.sd, ParameterRef), "bind() the objective first"
        return likelihoods.negative_log_likelihood(
            self.loss,
            simulated,
            self.observed.values,
            n=self.observed.n,
            dispersion=self.dispersion,
            sd=self.sd,
        )


def make_objective(target: TargetSpec) -> Objective:
    """The objective of a configured target, its observed data loaded and checked."""
    return Objective(
        target=target.name,
        output_key=target.output_key,
        loss=target.loss,
        observed=load_target_data(target),
        align=target.align,
        combine=target.combine,
        # a user's loss travels as its reference and is imported on the worker (simcal.tasks)
        custom=None if target.loss in BUILTIN_LOSSES else target.loss,
        dispersion=target.dispersion,
        sd=target.sd,
        simulated=target.simulated or "probability",
        n_output=target.n_output,
    )


def misfits(objectives: Mapping[str, Objective], output: Any) -> tuple[list[str], list[str]]:
    """What is wrong with one replicate's ``output`` for these targets' objectives, judged
    as a trial's aggregation would (time alignment, shape, key, loss): (problems, warnings).

    A problem stops a calibration before its first trial (every trial would fail alike); a
    warning (a loss that is not finite at this one point) does not. The probe runs this on
    a worker beside its one call of the model, so the driver computes no loss.
    """
    problems: list[str] = []
    warnings: list[str] = []
    for name, objective in objectives.items():
        try:
            value = objective.evaluate([output])
        except Exception as exc:  # a misfit, or the user's loss failing: report what it raised
            text = str(exc) if isinstance(exc, NonFiniteLossError) else describe(exc)
            named = text if repr(name) in text else f"target {name!r}: {text}"
            (warnings if isinstance(exc, NonFiniteLossError) else problems).append(named)
            continue
        if not math.isfinite(value):
            warnings.append(f"target {name!r}: loss is {value}")
    return problems, warnings
