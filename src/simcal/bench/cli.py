"""The ``simcal bench`` subcommand: parse its options, run the suite, write the outputs."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from simcal.argtypes import positive_int

log = logging.getLogger(__name__)

QUIET_LOGGERS = ("simcal.driver", "distributed", "optuna")


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``bench`` on the ``simcal`` command's subparsers."""
    bench = commands.add_parser(
        "bench",
        help="measure gather cost, throughput and optimizer cost (see docs/performance.md)",
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="smallest setting: 2 workers, about 30 s (the test)"
    )
    size.add_argument("--full", action="store_true", help="the grid W 8,16,32 x d 0.05,0.2,1.0")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    bench.add_argument(
        "--storage",
        choices=("memory", "sqlite"),
        default="memory",
        help="Optuna storage of the throughput runs (a temporary SQLite file, or in memory)",
    )
    bench.add_argument(
        "--posterior",
        type=int,
        metavar="SEEDS",
        help="only the posterior coverage check over SEEDS synthetic data sets (docs/posterior.md)",
    )
    bench.add_argument(
        "--pruning",
        type=int,
        metavar="SEEDS",
        help="only pruning vs no pruning, SEIR and synthetic, SEEDS seeds each",
    )
    bench.add_argument(
        "--storages",
        help="compare storages instead of the suite: a comma list of memory, default, sqlite, "
        "postgresql (streaming, W=8, d=0.05 and 0.2 s, R=5)",
    )
    bench.add_argument(
        "--starsim",
        type=positive_int,
        metavar="SEEDS",
        help="only simcal vs Starsim's ss.Calibration on Starsim's SIR example (docs/starsim.md)",
    )
    bench.add_argument(
        "--starsim-replicates",
        type=_replicate_counts,
        default=(5, 1),
        metavar="R,R",
        help="--starsim: replicates per trial, one comparison each (default: 5,1)",
    )
    bench.add_argument("--postgres-url", help="the PostgreSQL URL for --storages postgresql")
    bench.add_argument(
        "--installs",
        help="compare Python environments instead of the suite, paired: a comma list of "
        "name=/path/to/python (e.g. pinned=.venv/bin/python,plain=/var/tmp/simcal-newest-optuna"
        "/bin/python); streaming, W=8, R=5, d=0.05 s, default storage",
    )
    bench.add_argument(
        "--rounds", type=positive_int, default=3, help="--installs: rounds (default: 3)"
    )
    bench.add_argument(
        "--scale",
        action="store_true",
        help="scale run instead of the suite: scheduler in its own process, 4 threaded workers "
        "x 64 threads, d=1 s, R=4, 2,000 trials, default storage and sampler (--quick: tiny)",
    )
    bench.add_argument(
        "--drivers",
        type=positive_int,
        default=1,
        help="--scale with this many drivers on one study (this process and simcal run "
        "processes), the budget shared",
    )
    bench.set_defaults(handler=cmd_bench)


def _replicate_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma list of replicate counts of at least 1, e.g. 5,1"
        ) from None


def cmd_bench(args: argparse.Namespace) -> int:
    """``simcal bench``: run the benchmark suite and write JSON, markdown and PNG."""
    from simcal.bench.markdown import to_markdown, write_outputs
    from simcal.bench.suite import PRESETS, run_suite

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.posterior or args.pruning:
        from simcal.bench.science import run_science

        return run_science(args.out, args.posterior, args.pruning)
    if args.storages:
        return _compare_storages(args)
    if args.installs:
        return _compare_installs(args)
    if args.starsim:
        from simcal.bench.starsim import run_bench

        return run_bench(
            args.out, args.starsim, quick=args.quick, replicates=args.starsim_replicates
        )
    if args.scale:
        return _scale(args)
    settings = PRESETS["quick" if args.quick else "full" if args.full else "default"]
    log.info("simcal bench, %s settings; results in %s", settings.name, args.out)
    results = run_suite(settings, storage=args.storage)
    paths = write_outputs(results, args.out)
    print(to_markdown(results))
    for kind, path in paths.items():
        log.info("wrote %s: %s", kind, path)
    return 0


def _compare_storages(args: argparse.Namespace) -> int:
    import json

    from simcal.bench.storages import compare_storages, storage_urls, storages_markdown
    from simcal.config import ConfigError

    names = [name.strip() for name in args.storages.split(",") if name.strip()]
    try:
        storage_urls(names, "/tmp", args.postgres_url)
    except ValueError as exc:
        raise ConfigError(f"--storages: {exc}") from None
    if args.quick:
        result = compare_storages(
            names, args.postgres_url, workers=2, durations=(0.05,), replicates=2, seconds=1.5,
            rounds=1,
        )
    else:
        result = compare_storages(names, args.postgres_url)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storages.json").write_text(json.dumps(result, indent=2) + "\n")
    text = storages_markdown(result)
    (args.out / "storages.md").write_text(text)
    print(text)
    return 0


def _compare_installs(args: argparse.Namespace) -> int:
    import json

    from simcal.bench.installs import compare_installs, installs_markdown, parse_installs
    from simcal.config import ConfigError

    try:
        installs = parse_installs(args.installs)
    except ValueError as exc:
        raise ConfigError(f"--installs: {exc}") from None
    if args.quick:
        result = compare_installs(
            installs, workers=2, duration=0.05, replicates=2, seconds=1.5, rounds=1
        )
    else:
        result = compare_installs(installs, rounds=args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "installs.json").write_text(json.dumps(result, indent=2) + "\n")
    text = installs_markdown(result)
    (args.out / "installs.md").write_text(text)
    print(text)
    return 0


def _scale(args: argparse.Namespace) -> int:
    import json

    from simcal.bench.scale import ScaleSettings, scale_run

    settings = ScaleSettings(drivers=args.drivers)
    if args.quick:
        settings = ScaleSettings(
            workers=2, threads=4, duration=0.2, replicates=2, trials=30, profile_trials=10,
            drivers=args.drivers,
        )
    log.info("scale run: %s; load average %s", settings, os.getloadavg())
    result = scale_run(settings, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0
