"""The Python API: a calibration built in Python or read from YAML, run on any Dask client.

``Calibration`` holds one validated :class:`~simcal.config.CalibrationConfig` (the YAML is
its serialization: :meth:`Calibration.from_yaml`, :meth:`Calibration.to_yaml`);
:meth:`Calibration.run` wires study, sampler, service, probe and driver exactly as
``simcal run`` does (the CLI calls :func:`drive` too) and returns a :class:`Result`.

- ``model``: a function or ``"module:callable"``. A function importable by its name (from a
  module, even one beside the notebook) is kept as that reference: workers import it and a
  local module is shipped to them (:mod:`simcal.shipping`). A function of ``__main__`` (a
  notebook's, a script's), a lambda or a nested function travels by value (cloudpickle).
- ``observed``: a pandas DataFrame, a mapping of columns, a 1-D array, a CSV path or
  ``"module:callable"``; tables follow the CSV format's column rules (value column named like
  the target or the only other one, ``t`` or ``date``, ``n``).
- ``storage=None``: a temporary SQLite file owned by the :class:`Result`, removed by
  :meth:`Result.close` (or when the result is garbage collected).
- ``run(client=None)``: a local cluster of ``workers`` processes, closed after the run; a
  client of yours is used and never closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import logging
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from simcal.cluster import ClusterOptions, connect, wait_for_workers
from simcal.config import (
    CalibrationConfig,
    ConfigError,
    ParameterSpec,
    TargetSpec,
    describe_validation,
    load_config,
    validate_config,
)
from simcal.driver import Calibration as Driver
from simcal.driver import RunStats
from simcal.metrics import Metrics
from simcal.probe import probe_cluster
from simcal.progress import ProgressReporter
from simcal.samplers import make_sampler
from simcal.service import SimulationService
from simcal.shipping import installed_imports
from simcal.storage import open_study, redact
from simcal.studyshape import check_shape

log = logging.getLogger("simcal")

__all__ = ["Calibration", "Parameter", "Result", "Target"]


class Parameter(ParameterSpec):
    """A parameter's search range: ``Parameter(low, high, log=False)``; a ``(low, high)``
    tuple is the same without ``log``."""

    def __init__(self, low: float, high: float, log: bool = False) -> None:
        try:
            super().__init__(low=low, high=high, log=log)
        except ValidationError as exc:
            raise ConfigError(describe_validation(exc, "parameter")) from None


class Target(TargetSpec):
    """A target: ``Target(name, observed, loss="mse", n=None, **options)``; the options are
    the YAML target's keys (``output``, ``weight``, ``align``, ``combine``, ``dispersion``,
    ``sd``, ``start_date``). ``n``: the column of a DataFrame (or mapping) holding the trials
    of a binomial loss, when it is not named ``n``."""

    def __init__(
        self, name: str, observed: Any, loss: str = "mse", n: str | None = None, **options: Any
    ) -> None:
        if n is not None and n != "n":
            observed = _renamed(name, observed, n)
        try:
            super().__init__(name=name, observed=observed, loss=loss, **options)
        except ValidationError as exc:
            raise ConfigError(describe_validation(exc, f"target {name!r}")) from None


def _renamed(name: str, observed: Any, column: str) -> Any:
    """``observed`` (a DataFrame or mapping) with its ``column`` named ``n``."""
    if hasattr(observed, "columns"):  # a DataFrame
        keys = [str(key) for key in observed.columns]
    elif isinstance(observed, Mapping):
        keys = [str(key) for key in observed]
    else:
        problem = "applies to a DataFrame or a mapping of columns"
        raise ConfigError(f"invalid target {name!r}:\n  n: {column!r} {problem}")
    if column not in keys:
        raise ConfigError(f"invalid target {name!r}:\n  n: {column!r} names no column of {keys}")
    if "n" in keys:
        raise ConfigError(f"invalid target {name!r}:\n  n: there is a column 'n' already")
    if hasattr(observed, "columns"):
        return observed.rename(columns={column: "n"})
    return {("n" if key == column else key): value for key, value in observed.items()}


def _parameter(name: str, spec: Any) -> Any:
    if isinstance(spec, ParameterSpec):
        return spec.model_dump()
    if isinstance(spec, tuple | list) and len(spec) == 2:
        return {"low": spec[0], "high": spec[1]}
    if isinstance(spec, Mapping):
        return dict(spec)
    raise ConfigError(
        f"invalid config:\n  parameters.{name}: expected (low, high) or "
        f"simcal.Parameter(low, high, log=False), got {spec!r}"
    )


def _target(target: Any) -> Any:
    if isinstance(target, TargetSpec):  # a CSV path as given: it resolves against the cwd
        return target.model_dump(exclude_unset=True)
    return target  # a mapping: validated with the rest


class Calibration:
    """A calibration to run: the model, its parameters' ranges, the targets and the budget.

    ``Calibration(model=, parameters=, targets=, replicates=8, max_trials=200, storage=None,
    study="calibration", **options)``: ``options`` are the YAML config's other keys
    (``seed``, ``sampler``, ``mode``, ``model_options``, ``trial_timeout``, ``pruning``, ...).
    Bad values raise :class:`simcal.config.ConfigError` naming the field.
    """

    def __init__(
        self,
        model: Callable[..., Any] | str,
        parameters: Mapping[str, Any],
        targets: Sequence[Any],
        *,
        replicates: int = 8,
        max_trials: int = 200,
        storage: str | None = None,
        study: str = "calibration",
        **options: Any,
    ) -> None:
        if not isinstance(parameters, Mapping):
            raise ConfigError(
                "invalid config:\n  parameters: expected a mapping of name to (low, high), "
                f"got {type(parameters).__name__}"
            )
        if isinstance(targets, TargetSpec | Mapping) or not isinstance(targets, Sequence):
            targets = [targets]
        data: dict[str, Any] = {
            "study": study,
            "model": model,
            "parameters": {name: _parameter(name, spec) for name, spec in parameters.items()},
            "targets": [_target(t) for t in targets],
            "replicates": replicates,
            "max_trials": max_trials,
            **options,
        }
        if storage is not None:
            data["storage"] = storage
        # relative CSV paths resolve against the current directory, made absolute
        self.config = validate_config(data, base_dir=Path.cwd())
        self.storage = storage

    @classmethod
    def from_config(cls, config: CalibrationConfig, *, temporary: bool = False) -> Calibration:
        """A calibration of a validated config; ``temporary``: ignore its storage, use a
        temporary one (as ``storage=None``)."""
        calibration = cls.__new__(cls)
        calibration.config = config
        calibration.storage = None if temporary else config.storage
        return calibration

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Calibration:
        """The calibration a YAML config describes (as ``simcal run --config`` reads it);
        ``overrides`` replace its keys (``max_trials=20``)."""
        return cls.from_config(load_config(path, overrides))

    def to_yaml(self, path: str | Path) -> Path:
        """Write the config as YAML that :meth:`from_yaml` and ``simcal run`` read back equal.

        A function model is written as ``module:qualname``; one defined in ``__main__`` (a
        notebook) cannot be: :class:`ConfigError` says so. Inline observed data is written
        inline (its columns as lists); CSV paths are absolute. ``storage=None`` writes no
        ``storage:`` (the CLI then uses its default, ``sqlite:///simcal.db``).
        """
        if not isinstance(self.config.model, str):
            raise ConfigError(
                f"invalid config:\n  model: {self.config.model_label} is defined in __main__ "
                "(a notebook or script), or is a lambda or nested function: YAML can only name "
                "it as 'module:callable'; move it into a module (a .py file beside the "
                "notebook) and pass it from there"
            )
        data = self.config.model_dump(mode="json", exclude_defaults=True)
        data = {"study": self.config.study, **data}
        if self.storage is None:
            data.pop("storage", None)
        path = Path(path)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    def run(
        self,
        client: Any = None,
        workers: int = 8,
        *,
        progress: bool | None = None,
        connect_timeout: float = 120.0,
        dashboard_address: str | None = "127.0.0.1:8787",
        allow_config_change: bool = False,
    ) -> Result:
        """Run the calibration and return its :class:`Result`.

        ``client``: a ``distributed.Client`` of any cluster (used, never closed; the run waits
        up to ``connect_timeout`` s for the config's ``min_workers``, else one worker); None
        starts a local cluster of ``workers`` single-threaded processes and closes it after. Every
        worker is probed first (imports the model; one call fits the targets). Ctrl-C (a
        notebook's interrupt) stops asking for trials and tells those in flight within the
        config's ``grace_period``; a second one stops at once, re-enqueueing the unfinished.
        ``progress``: None shows it in a notebook or on a terminal, False never.
        A study stores the shape (parameters, ranges, targets) it was created with; a run whose
        config differs raises :class:`~simcal.config.ConfigError` showing the difference, unless
        ``allow_config_change`` and only ranges changed (``--allow-config-change`` of the CLI).
        """
        config = self.config
        temporary = None
        if self.storage is None:
            temporary = tempfile.TemporaryDirectory(prefix="simcal-")
            url = f"sqlite:///{Path(temporary.name) / 'simcal.db'}"
            config = config.model_copy(update={"storage": url})
        try:
            check_targets(config)
            with _quiet_optuna():  # "A new study created": the summary says what ran
                study = open_run_study(config)
            check_shape(study, config, allow_change=allow_config_change)  # before nothing-to-do
            stats, seen = RunStats(), 0
            if not nothing_to_do(study, config):
                options = ClusterOptions(
                    workers=workers,
                    min_workers=config.min_workers,
                    connect_timeout=connect_timeout,
                    dashboard_address=dashboard_address,
                )
                stats, seen = drive(
                    config,
                    study,
                    Metrics(config.study),
                    client=client,
                    cluster=options,
                    progress=_progress(progress),
                    signals=(signal.SIGINT,),
                    restore_signals=True,
                )
        except BaseException:
            if temporary is not None:
                temporary.cleanup()
            raise
        return Result(config, study, stats, seen, temporary)

    def __repr__(self) -> str:
        c = self.config
        ranges = ", ".join(f"{k}=[{p.low:g}, {p.high:g}]" for k, p in c.parameters.items())
        return (
            f"Calibration(study={c.study!r}, model={c.model_label!r}, parameters: {ranges}; "
            f"targets {[t.name for t in c.targets]}, replicates={c.replicates}, "
            f"max_trials={c.max_trials}, storage={_storage_text(self.storage)})"
        )

    def _repr_html_(self) -> str:
        c = self.config
        rows = [
            (name, f"{p.low:g}", f"{p.high:g}", "log" if p.log else "linear")
            for name, p in c.parameters.items()
        ]
        targets = ", ".join(f"{t.name} ({t.loss})" for t in c.targets)
        return (
            f"<b>simcal.Calibration</b> <code>{html.escape(c.study)}</code>: model "
            f"<code>{html.escape(c.model_label)}</code>, targets {html.escape(targets)}, "
            f"{c.replicates} replicates, {c.max_trials} trials, storage "
            f"<code>{html.escape(_storage_text(self.storage))}</code>"
            + _html_table(("parameter", "low", "high", "scale"), rows)
        )


class Result:
    """A run's outcome, read from its study: best parameters, trials, fit, posterior, report.

    With ``storage=None`` the study lives in a temporary file this object owns:
    :meth:`close` (or leaving a ``with`` block, or garbage collection) removes it.
    """

    def __init__(
        self,
        config: CalibrationConfig,
        study: Any,
        stats: RunStats,
        workers: int = 0,
        temporary: tempfile.TemporaryDirectory[str] | None = None,
    ) -> None:
        self.config = config
        self.study = study
        self.stats = stats
        self.workers = workers
        self._temporary = temporary

    # -- what the run found --------------------------------------------------------------------

    def _completed(self) -> list[Any]:
        from optuna.trial import TrialState

        return [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None
        ]

    @property
    def best_trial(self) -> Any:
        """The completed trial of lowest loss (an Optuna ``FrozenTrial``), None without one."""
        completed = self._completed()
        return min(completed, key=lambda t: (t.value, t.number)) if completed else None

    @property
    def best_params(self) -> dict[str, float] | None:
        """The best trial's parameters (None: no trial completed)."""
        best = self.best_trial
        return dict(best.params) if best is not None else None

    @property
    def best_loss(self) -> float | None:
        """The best trial's loss (None: no trial completed)."""
        best = self.best_trial
        return float(best.value) if best is not None else None

    @property
    def stop_reason(self) -> str | None:
        """Why this run stopped: ``max_trials``, ``max_time``, ``target_loss``, ``signal``
        (interrupted: Ctrl-C), ..."""
        return self.stats.stop_reason

    @property
    def trials(self) -> Any:
        """Every stored trial as a pandas DataFrame: the rows of ``simcal results``."""
        import pandas as pd

        from simcal.summary import trial_rows

        rows = trial_rows(self.study.get_trials(deepcopy=False), self.config)
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        """This run's summary: the JSON ``simcal run`` prints."""
        from simcal.summary import summarize

        return summarize(self.study, self.stats, run_facts(self.config, self.workers))

    def plot_fit(self, target: str | None = None, *, top: int = 5) -> Any:
        """A matplotlib Figure of ``target``'s observed data against the best trial's
        replicates (median, 5-95 % band) and the medians of the next ``top - 1`` trials."""
        from simcal.notebook import show_figures_inline
        from simcal.reporting.figures import completed_by_loss, draw_fit
        from simcal.targets import load_target_data

        names = [t.name for t in self.config.targets]
        target = names[0] if target is None and len(names) == 1 else target
        if target not in names:
            raise ValueError(f"no target {target!r}; the targets are {names}")
        spec = self.config.targets[names.index(target)]
        ranked = completed_by_loss(self.study.get_trials(deepcopy=False))
        figure = draw_fit(spec, load_target_data(spec), ranked, top)
        show_figures_inline()
        return figure

    def posterior(self, method: str = "auto", quantile: float = 0.1) -> dict[str, Any]:
        """The approximate posterior: the same method and JSON as ``simcal posterior``."""
        from simcal.posterior import study_posterior

        return study_posterior(self.study, self.config, method=method, quantile=quantile)

    def report(self, out: str | Path, *, top: int = 10) -> Path:
        """Write ``simcal report``'s page (``report.html`` and its figures) into ``out``;
        returns the page's path."""
        from simcal.reporting.page import write_report

        return write_report(
            self.study, self.config, Path(out), top=top, storage_url=self.config.storage
        )

    # -- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove a temporary storage (``storage=None``); nothing for a storage of yours."""
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    def __enter__(self) -> Result:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- display ---------------------------------------------------------------------------------

    def _counts(self) -> str:
        s = self.stats
        text = f"{s.completed} completed, {s.failed} failed"
        text += f", {s.pruned} pruned" if getattr(s, "pruned", 0) else ""
        return text + (f"; stopped: {s.stop_reason}" if s.stop_reason else "")

    def __repr__(self) -> str:
        params = self.best_params
        shown = "none" if params is None else ", ".join(f"{k}={v:.6g}" for k, v in params.items())
        loss = "none" if self.best_loss is None else f"{self.best_loss:.6g}"
        return (
            f"Result(study={self.config.study!r}, this run: {self._counts()}; best loss {loss}; "
            f"best params: {shown})"
        )

    def _repr_html_(self) -> str:
        params = self.best_params or {}
        rows = [(name, f"{value:.6g}") for name, value in params.items()]
        loss = "none" if self.best_loss is None else f"{self.best_loss:.6g}"
        return (
            f"<b>simcal.Result</b> <code>{html.escape(self.config.study)}</code>: this run "
            f"{html.escape(self._counts())}; best loss <b>{loss}</b>"
            + (_html_table(("parameter", "best"), rows) if rows else "")
        )


def _storage_text(storage: str | None) -> str:
    return "temporary" if storage is None else redact(storage)


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _progress(show: bool | None) -> ProgressReporter:
    from simcal.notebook import NotebookProgress, in_notebook

    if show is False:
        return ProgressReporter(interactive=False)
    if in_notebook():
        return NotebookProgress()
    return ProgressReporter(interactive=None if show is None else True)


# -- the wiring `simcal run` and Calibration.run share --------------------------------------------


def check_targets(config: CalibrationConfig) -> None:
    """Load every target's observed data now, so a bad file fails before anything starts."""
    from simcal.targets import load_observed

    for index, target in enumerate(config.targets):
        try:
            load_observed(target)
        except Exception as exc:
            raise ConfigError(
                f"invalid config:\n  targets.{index}.observed: {type(exc).__name__}: {exc}"
            ) from None


def open_run_study(config: CalibrationConfig) -> Any:
    """The config's study in its storage (created if new), with the config's sampler."""
    return open_study(config.storage, config.study, make_sampler(config.sampler, config.seed))


def nothing_to_do(study: Any, config: CalibrationConfig) -> bool:
    """Whether the study already has its ``max_trials``; says so if it does."""
    from simcal.trials import counted_trials, with_retries

    done = with_retries(lambda: counted_trials(study), what="count trials")
    if done < config.max_trials:
        return False
    log.warning(
        "nothing to do: study %s has %d of %d trials; raise --max-trials to continue",
        config.study, done, config.max_trials,
    )
    return True


def run_facts(config: CalibrationConfig, workers: int) -> dict[str, Any]:
    """The summary's facts about the run itself."""
    return {"mode": config.mode, "workers": workers, "storage": redact(config.storage)}


@contextlib.contextmanager
def _client(client: Any, options: ClusterOptions) -> Iterator[Any]:
    if client is not None:  # the caller's: never closed here
        # a cluster scaled a moment ago (SLURM jobs, Kubernetes pods) may have no worker yet
        need = options.min_workers or 1
        wait_for_workers(client, need, options.connect_timeout, " the client's cluster")
        yield client
        return
    with connect(options) as started:
        yield started


def drive(
    config: CalibrationConfig,
    study: Any,
    metrics: Metrics,
    *,
    client: Any = None,
    cluster: ClusterOptions | None = None,
    progress: ProgressReporter | None = None,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    restore_signals: bool = False,
    stoppers: list[Any] | None = None,
) -> tuple[RunStats, int]:
    """Connect (``client``, else ``cluster``'s options), probe, run the ask/tell loop with
    ``signals`` asking it to stop; returns this run's stats and the workers connected.
    ``stoppers`` (``simcal run``'s own signal handler): the loop's ``request_stop`` is
    appended to it once the loop exists."""
    options = cluster or ClusterOptions()
    if client is None and not options.scheduler and not options.preload:
        options = dataclasses.replace(options, preload=tuple(installed_imports(config.model)))
    with _client(client, options) as client:
        if client.dashboard_link:
            log.info("Dask dashboard: %s", client.dashboard_link)
        service = SimulationService(client)
        probe_cluster(service, config)  # before any trial is asked: fail fast, count none
        reporter = progress or ProgressReporter()
        calibration = Driver(config, service, study, metrics, progress=reporter)
        previous = _on_signals(calibration.request_stop, signals)
        if stoppers is not None:
            stoppers.append(calibration.request_stop)
        try:
            stats = calibration.run()
        finally:
            if restore_signals:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
    return stats, workers


def _on_signals(stop: Any, signals: Sequence[signal.Signals]) -> dict[int, Any]:
    """Handle ``signals`` by asking ``stop`` (again: stop now); returns the previous handlers.
    Off the main thread nothing is installed (Python runs handlers only there)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    received = []

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if received:
            log.warning("%s again: stopping now; unfinished trials are re-enqueued", name)
        else:
            log.warning("%s: no new trials; finishing those in flight (again: stop now)", name)
        received.append(signum)
        stop("signal")

    return {signum: signal.signal(signum, handler) for signum in signals}
