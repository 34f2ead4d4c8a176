"""The ``simcal`` command: parse arguments, build the parts, wire them together."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from simcal import __version__
from simcal.argtypes import Parser, add_study_arguments, resolve_study_config
from simcal.argtypes import number as _number
from simcal.argtypes import positive_int as _positive_int
from simcal.bench.cli import add_bench_parser
from simcal.config import CalibrationConfig, ConfigError, load_config
from simcal.exits import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NO_TRIAL,
    EXIT_OK,
    EXIT_USAGE,
    quiet_on_broken_pipe,
)
from simcal.posterior import add_posterior_parser
from simcal.reporting.cli import add_report_parser
from simcal.submit import add_submit_parser

log = logging.getLogger("simcal")

def _port(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value


def _seconds(text: str) -> float:
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or any(c.isspace() for c in host):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 0-65535), got {text!r}")
    return text


def _memory_limit(text: str) -> str:
    if text == "auto":
        return text
    from dask.utils import parse_bytes

    try:
        value = float(text) if text.replace(".", "", 1).isdigit() else parse_bytes(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"expected 'auto', a byte size such as 4GiB, or a fraction of memory, got {text!r}"
        ) from None
    if not value >= 0:  # 0: no limit
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return text


def _add_run_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run a calibration")
    add_study_arguments(run)
    run.add_argument(
        "--scheduler",
        help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS, else a local cluster)",
    )
    run.add_argument("--workers", type=_positive_int, default=8, help="local cluster workers")
    run.add_argument("--min-workers", type=_positive_int, help="workers to wait for")
    run.add_argument("--connect-timeout", type=_seconds, default=120.0, help="seconds")
    run.add_argument("--max-trials", type=_positive_int, help="trial budget (overrides config)")
    run.add_argument("--mode", choices=("streaming", "batch"), help="overrides the config")
    run.add_argument("--grace-period", type=_seconds, help="seconds to finish trials on SIGTERM")
    run.add_argument(
        "--allow-config-change",
        action="store_true",
        help="continue a study whose parameter ranges differ from the config's (widened on "
        "purpose); other changes need a new study name",
    )
    run.add_argument("--summary", type=Path, help="write the JSON summary to this file")
    run.add_argument("--metrics-port", type=_port, default=8000, help="0 disables")
    run.add_argument("--metrics-host", default="0.0.0.0", help="metrics bind address")
    run.add_argument(
        "--metrics-linger",
        type=_seconds,
        default=0.0,
        help="keep /metrics up this many seconds after the run",
    )
    run.add_argument(
        "--report-interval",
        type=_seconds,
        default=30.0,
        help="regenerate the live /report at most every this many seconds (0 disables it)",
    )
    run.add_argument(
        "--dashboard-address",
        type=_host_port,
        default="127.0.0.1:8787",
        help="local cluster dashboard",
    )
    run.add_argument(
        "--worker-memory-limit", type=_memory_limit, help="local cluster memory limit per worker"
    )
    run.add_argument("--tls-ca-file", type=Path, help="CA certificate for Dask TLS")
    run.add_argument("--tls-cert", type=Path, help="client certificate for Dask TLS")
    run.add_argument("--tls-key", type=Path, help="client key for Dask TLS")
    run.set_defaults(handler=cmd_run, prestart=prestart_local_workers)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(  # every subcommand's parser too (parser_class): --help shows defaults
        prog="simcal", description="Calibrate stochastic simulation models on a Dask cluster."
    )
    parser.add_argument("--version", action="version", version=f"simcal {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"), help="log verbosity"
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    _add_run_parser(commands)
    add_bench_parser(commands)
    add_submit_parser(commands)
    add_posterior_parser(commands)
    add_report_parser(commands)

    results = commands.add_parser("results", help="print every stored trial")
    add_study_arguments(results)
    results.add_argument("--format", choices=("csv", "json"), default="csv", help="output")
    results.add_argument(
        "--sort", choices=("number", "loss"), default="number", help="row order (loss: best first)"
    )
    results.set_defaults(handler=cmd_results)

    check = commands.add_parser("check-config", help="validate a config and print it resolved")
    check.add_argument("file", type=Path)
    check.add_argument(
        "--probe",
        action="store_true",
        help="also call the model once here (parameter midpoints) and check its output",
    )
    check.set_defaults(handler=cmd_check_config)
    return parser


def _security(args: argparse.Namespace) -> object | None:
    from simcal.cluster import security_from_files

    return security_from_files(args.tls_ca_file, args.tls_cert, args.tls_key)


def _check_targets(config: CalibrationConfig) -> None:
    """Load every target's observed data now, so a bad file fails before anything starts."""
    from simcal.api import check_targets

    check_targets(config)


def _scheduler(args: argparse.Namespace) -> str | None:
    return args.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


def cmd_run(args: argparse.Namespace) -> int:
    """``simcal run``: the calibration (wired by :func:`simcal.api.drive`, as the API runs)."""
    from simcal.workerstart import stop_prestarted_workers

    try:
        return _run(args, _scheduler(args))
    finally:
        stop_prestarted_workers()  # one the run did not adopt (it ended before its cluster)


def prestart_local_workers(args: argparse.Namespace) -> None:
    """``simcal run`` without a scheduler: start the local cluster's worker server first thing
    (:func:`main` calls it before its own imports), so it imports the model's installed
    packages while the driver imports everything else and the model to validate it. The
    console script started it earlier still (:mod:`simcal.launch`); then this logs it."""
    from simcal.workerstart import prestart_for_config

    if _scheduler(args) is None:
        prestart_for_config(args.config)


def _run(args: argparse.Namespace, scheduler: str | None) -> int:
    """:func:`cmd_run`'s body."""
    from simcal.api import drive, nothing_to_do, open_run_study, run_facts
    from simcal.cluster import ClusterOptions
    from simcal.driver import RunStats
    from simcal.failfast import STOP_REASON
    from simcal.metrics import Metrics
    from simcal.studyshape import check_shape
    from simcal.summary import summarize

    config = resolve_study_config(
        args,
        max_trials=args.max_trials,
        mode=args.mode,
        grace_period=args.grace_period,
        min_workers=args.min_workers,
    )
    security = _security(args)
    _check_targets(config)
    if args.summary and not args.summary.parent.is_dir():
        raise ConfigError(f"--summary {str(args.summary)!r}: directory does not exist")
    if scheduler:
        source = "--scheduler" if args.scheduler else "DASK_SCHEDULER_ADDRESS"
        from simcal.cluster import check_scheduler_address

        check_scheduler_address(scheduler, source, security)
    study = open_run_study(config)
    check_shape(study, config, allow_change=args.allow_config_change)  # before nothing-to-do
    if nothing_to_do(study, config):  # before a cluster is started for nothing
        _write_summary(args, summarize(study, RunStats(), run_facts(config, 0)))
        return EXIT_OK
    metrics = Metrics(config.study)
    http = None
    if args.metrics_port:
        from simcal.reporting.live import DriverHTTP

        try:
            http = DriverHTTP(
                metrics, config, args.metrics_port, args.metrics_host, args.report_interval
            )
            port = http.port
        except OSError as exc:
            raise ConfigError(
                f"--metrics-host {args.metrics_host} --metrics-port {args.metrics_port}: "
                f"cannot listen ({exc.strerror or exc}); pick another port or 0 to disable"
            ) from None
        log.info("metrics and live report on http://%s:%d/", args.metrics_host, port)
    options = ClusterOptions(
        scheduler=scheduler,
        workers=args.workers,
        min_workers=config.min_workers,
        connect_timeout=args.connect_timeout,
        dashboard_address=args.dashboard_address,
        worker_memory_limit=args.worker_memory_limit,
        security=security,
    )
    metrics.set_min_workers(options.required_workers)
    stoppers: list[Any] = []  # the calibration's request_stop, once it exists
    _on_signals(stoppers)
    try:
        stats, workers = drive(
            config, study, metrics, cluster=options, signals=(), stoppers=stoppers
        )
        linger = args.metrics_linger if args.metrics_port else 0.0
        if linger:  # logged before the summary, which is the last thing the run writes
            log.info("keeping /metrics and /report up for %.0fs", linger)
        _write_summary(args, summarize(study, stats, run_facts(config, workers)))
        time.sleep(linger)
    finally:
        if http is not None:
            http.close()
    if stats.stop_reason.startswith(STOP_REASON):
        print(
            f"simcal: error: {stats.stop_reason}; fix it and run again (`simcal results` "
            "shows each trial's error)",
            file=sys.stderr,
        )
        return EXIT_NO_TRIAL
    if stats.completed == 0 and stats.failed:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.errors.items()))
        print(
            f"simcal: error: no trial completed: all {stats.failed} trials of this run failed "
            f"({reasons}); `simcal results` shows each trial's error",
            file=sys.stderr,
        )
        return EXIT_NO_TRIAL
    return EXIT_OK


def _write_summary(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    """The run's summary on stdout, in one write, and in ``--summary``. Nothing may log while it
    is written: a container runtime copies stdout and stderr line by line, so a log line written
    at the same moment lands inside the JSON of ``kubectl logs``."""
    text = json.dumps(summary, indent=2, default=str)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    if args.summary:
        args.summary.write_text(text + "\n", encoding="utf-8")


def _on_signals(stoppers: list[Any]) -> None:
    """SIGTERM (an eviction, ``kill``): no new trials, those in flight get the grace period.
    SIGINT (Ctrl-C in the terminal): stop now, as a CLI should: tell what has finished and
    re-enqueue the rest (the local workers ignore it: :mod:`simcal.workersignals`).

    Before the calibration exists (``stoppers`` empty: the cluster starts, the probe runs) no
    trial has been asked and nothing needs telling: the process exits at once, 128 + the
    signal (a KeyboardInterrupt raised there could be swallowed by a callback of Dask's).
    Local workers notice their parent is gone and exit too.
    """
    signals = []

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if not stoppers:
            print(f"simcal: {name} before the first trial: stopped, nothing to tell",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        stop = stoppers[-1]
        if signals:
            log.warning("%s again: stopping now; unfinished trials are re-enqueued", name)
        elif signum == signal.SIGINT:
            log.warning(
                "%s: stopping now: finished trials are told, those in flight re-enqueued "
                "for the next run", name,
            )
        else:
            log.warning("%s: no new trials; finishing those in flight (again: stop now)", name)
        now = bool(signals) or signum == signal.SIGINT
        signals.append(signum)
        stop("signal", now=now)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_results(args: argparse.Namespace) -> int:
    """``simcal results``: every stored trial as CSV or JSON."""
    from simcal.reporting.studies import load_existing_study
    from simcal.summary import format_rows, trial_rows

    config = resolve_study_config(args)
    study = load_existing_study(config.storage, config.study)  # never creates a storage
    rows = trial_rows(study.get_trials(deepcopy=False), config, sort=args.sort)
    sys.stdout.write(format_rows(rows, args.format))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """``simcal check-config``: validate and print the resolved config."""
    from simcal.storage import redact

    config = load_config(args.file)
    _check_targets(config)
    resolved = config.model_dump(mode="json")
    resolved["storage"] = redact(config.storage)
    if args.probe:
        from simcal.probe import ProbeError, probe_locally

        try:
            resolved["probe"] = probe_locally(config)
        except ProbeError as exc:
            raise ConfigError(str(exc)) from None
    print(json.dumps(resolved, indent=2))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if getattr(args, "prestart", None) is not None:  # before the imports below: 0.5 s sooner
        args.prestart(args)
    import optuna
    import sqlalchemy.exc

    from simcal.cluster import ClusterError
    from simcal.driver import SchedulerLostError
    from simcal.failures import describe
    from simcal.probe import ModelFailsError, ProbeError
    from simcal.storage import StorageError, StorageURLError

    # after importing distributed, whose own logging setup sets its level to INFO
    logging.getLogger("distributed").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    try:
        return quiet_on_broken_pipe(lambda: args.handler(args))
    except KeyboardInterrupt:  # Ctrl-C in another subcommand
        print("simcal: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, StorageURLError, ModelFailsError) as exc:
        print(f"simcal: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, ClusterError, SchedulerLostError, ProbeError) as exc:
        print(f"simcal: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
        log.debug("storage failure", exc_info=True)
        cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
        print(f"simcal: error: storage failed: {describe(cause or exc)}", file=sys.stderr)
        return EXIT_FAILURE


def entry() -> NoReturn:
    """The console script and ``python -m simcal.cli``: :func:`main`, then an exit without the
    interpreter's teardown. With Dask, Optuna, SQLAlchemy and pandas loaded, freeing every
    module took 0.43 s after the work was done (traced: no I/O); the threads' join, the atexit
    handlers (logging's flush among them) and closing the storages still come first."""
    status = [EXIT_FAILURE]  # an exception escaping main: its traceback, then 1

    def finish() -> None:  # registered first, so the last atexit handler to run
        workerstart = sys.modules.get("simcal.workerstart")
        if workerstart is not None:  # started by simcal.launch for a command line main refused
            workerstart.stop_prestarted_workers()
        storage = sys.modules.get("simcal.storage")
        if storage is not None:
            storage.close_storages()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe: nothing left to say
                stream.flush()
        os._exit(status[0])

    atexit.register(finish)
    try:
        status[0] = main()
    except SystemExit as exc:  # argparse's 2, --help's 0
        code = exc.code
        status[0] = code if isinstance(code, int) else (EXIT_OK if code is None else 1)
        raise
    except KeyboardInterrupt:
        status[0] = EXIT_INTERRUPTED
        raise
    sys.exit(status[0])


if __name__ == "__main__":
    entry()
