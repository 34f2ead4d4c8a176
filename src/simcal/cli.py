"""The ``simcal`` command: parse arguments, build the parts, wire them together."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simcal import __version__
from simcal.config import CalibrationConfig, ConfigError, demo_config, load_config

log = logging.getLogger("simcal")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="calibration YAML (default: the SEIR demo)")
    parser.add_argument("--study", help="study name (overrides the config)")
    parser.add_argument(
        "--storage",
        help="SQLAlchemy URL of the Optuna storage (default: $SIMCAL_STORAGE, then the config)",
    )


def _add_run_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run a calibration")
    _add_study_arguments(run)
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
        "--dashboard-address", default="127.0.0.1:8787", help="local cluster dashboard"
    )
    run.add_argument("--worker-memory-limit", help="local cluster memory limit per worker")
    run.add_argument("--tls-ca-file", type=Path, help="CA certificate for Dask TLS")
    run.add_argument("--tls-cert", type=Path, help="client certificate for Dask TLS")
    run.add_argument("--tls-key", type=Path, help="client key for Dask TLS")
    run.set_defaults(handler=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simcal", description="Calibrate stochastic simulation models on a Dask cluster."
    )
    parser.add_argument("--version", action="version", version=f"simcal {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(commands)

    results = commands.add_parser("results", help="print every stored trial")
    _add_study_arguments(results)
    results.add_argument("--format", choices=("csv", "json"), default="csv")
    results.set_defaults(handler=cmd_results)

    check = commands.add_parser("check-config", help="validate a config and print it resolved")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=cmd_check_config)
    return parser


def _resolve_config(args: argparse.Namespace, **overrides: Any) -> CalibrationConfig:
    overrides["study"] = args.study
    overrides["storage"] = args.storage or os.environ.get("SIMCAL_STORAGE")
    if args.config is None:
        return demo_config(overrides)
    return load_config(args.config, overrides)


def _security(args: argparse.Namespace) -> object | None:
    files = (args.tls_ca_file, args.tls_cert, args.tls_key)
    if not any(files):
        return None
    if not all(files):
        raise ConfigError("--tls-ca-file, --tls-cert and --tls-key must be given together")
    for path in files:
        if not path.is_file():
            raise ConfigError(f"TLS file {str(path)!r} does not exist")
    from distributed.security import Security

    return Security(
        tls_ca_file=str(args.tls_ca_file),
        tls_client_cert=str(args.tls_cert),
        tls_client_key=str(args.tls_key),
        require_encryption=True,
    )


def cmd_run(args: argparse.Namespace) -> int:
    """``simcal run``: the calibration."""
    from simcal.cluster import ClusterOptions, connect
    from simcal.driver import Calibration
    from simcal.metrics import Metrics
    from simcal.progress import ProgressReporter
    from simcal.report import summarize
    from simcal.service import SimulationService
    from simcal.storage import make_sampler, open_study, redact

    config = _resolve_config(
        args,
        max_trials=args.max_trials,
        mode=args.mode,
        grace_period=args.grace_period,
        min_workers=args.min_workers,
    )
    security = _security(args)
    study = open_study(config.storage, config.study, make_sampler(config.sampler, config.seed))
    metrics = Metrics(config.study)
    if args.metrics_port:
        try:
            port = metrics.serve(args.metrics_port, args.metrics_host)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {args.metrics_port}: cannot listen ({exc.strerror}); "
                "pick another port or 0 to disable"
            ) from None
        log.info("metrics on http://%s:%d/metrics", args.metrics_host, port)
    scheduler = args.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
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
    try:
        with connect(options) as client:
            if client.dashboard_link:
                log.info("Dask dashboard: %s", client.dashboard_link)
            calibration = Calibration(
                config, SimulationService(client), study, metrics, progress=ProgressReporter()
            )
            _on_signals(calibration.request_stop)
            stats = calibration.run()
            workers = len(client.scheduler_info(n_workers=-1)["workers"])
        summary = summarize(
            study,
            stats,
            {"mode": config.mode, "workers": workers, "storage": redact(config.storage)},
        )
        text = json.dumps(summary, indent=2, default=str)
        print(text)
        if args.summary:
            args.summary.write_text(text + "\n", encoding="utf-8")
        if args.metrics_linger and args.metrics_port:
            log.info("keeping /metrics up for %.0fs", args.metrics_linger)
            time.sleep(args.metrics_linger)
    finally:
        metrics.close()
    return EXIT_OK


def _on_signals(stop: Any) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.warning("%s: no new trials; finishing those in flight", signal.Signals(signum).name)
        stop("signal")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_results(args: argparse.Namespace) -> int:
    """``simcal results``: every stored trial as CSV or JSON."""
    import optuna

    from simcal.report import format_rows, trial_row
    from simcal.storage import StorageError, redact

    config = _resolve_config(args)
    try:
        study = optuna.load_study(study_name=config.study, storage=config.storage)
    except KeyError:
        raise StorageError(f"no study {config.study!r} in {redact(config.storage)}") from None
    except Exception as exc:
        raise StorageError(f"cannot read {redact(config.storage)}: {type(exc).__name__}") from None
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    sys.stdout.write(format_rows(rows, args.format))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """``simcal check-config``: validate and print the resolved config."""
    config = load_config(args.file)
    print(json.dumps(config.model_dump(mode="json"), indent=2))
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
    logging.getLogger("distributed").setLevel(logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from simcal.cluster import ClusterError
    from simcal.driver import SchedulerLostError
    from simcal.storage import StorageError

    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"simcal: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, ClusterError, SchedulerLostError) as exc:
        print(f"simcal: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
