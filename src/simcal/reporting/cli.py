"""The ``simcal report`` and ``simcal studies`` subcommands (read-only on storage)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from simcal.argtypes import add_study_arguments, positive_int, resolve_study_config
from simcal.config import ConfigError

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("simcal-report")
DEFAULT_TOP = 5




def add_report_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``report`` and ``studies`` on the ``simcal`` command's subparsers."""
    report = commands.add_parser(
        "report", help="write an HTML report of a study: fit, loss, parameters, throughput"
    )
    add_study_arguments(report)
    report.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/)"
    )
    report.add_argument(
        "--top",
        type=positive_int,
        default=DEFAULT_TOP,
        help=f"best trials shown (default {DEFAULT_TOP})",
    )
    report.set_defaults(handler=cmd_report)

    studies = commands.add_parser(
        "studies", help="list the studies in a storage with trial counts and best loss"
    )
    studies.add_argument(
        "--storage", help="SQLAlchemy URL of the Optuna storage (default: $SIMCAL_STORAGE)"
    )
    studies.set_defaults(handler=cmd_studies)


def check_writable(out: Path) -> None:
    """``out`` exists or can be made, and a file can be written in it (else ConfigError)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--out {str(out)!r}: cannot write there ({exc.strerror or exc})"
        ) from None


def cmd_report(args: argparse.Namespace) -> int:
    """``simcal report``: the study's report in ``--out``."""
    from simcal.reporting.page import write_report
    from simcal.reporting.studies import load_existing_study

    config = resolve_study_config(args)
    study = load_existing_study(config.storage, config.study)
    check_writable(args.out)
    path = write_report(study, config, args.out, top=args.top, storage_url=config.storage)
    print(path)
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    """``simcal studies``: one line per study in the storage."""
    from simcal.reporting.studies import list_studies

    url = args.storage or os.environ.get("SIMCAL_STORAGE")
    if not url:
        raise ConfigError("--storage is required (or set SIMCAL_STORAGE)")
    listings = list_studies(url)
    if not listings:
        print("no studies", file=sys.stderr)
        return 0
    width = max(len(listing.name) for listing in listings)
    print(f"{'study':<{width}}  completed  failed  interrupted  running  best_loss")
    for s in listings:
        best = "" if s.best_loss is None else f"{s.best_loss:.6g}"
        print(
            f"{s.name:<{width}}  {s.completed:>9}  {s.failed:>6}  {s.interrupted:>11}  "
            f"{s.running:>7}  {best}"
        )
    return 0
