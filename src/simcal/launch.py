"""The ``simcal`` console script's first step: a local run's worker server starts before the CLI.

``simcal run`` on a local cluster waits for its worker server (:mod:`simcal.workerstart`) to
import distributed and the model's packages (about 2 s for a Starsim model) before the first
worker exists. The CLI's own imports (pydantic, numpy and every subcommand's parser) took
0.3 s before :func:`simcal.cli.main` could start it. Here the command line is read for the
two things that decide it (``--config``, ``--scheduler``) with only the standard library,
the server is started, and then :func:`simcal.cli.entry` runs as before: it parses the
command line in full, says what is wrong with it, and adopts the server (or stops it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

# options of `simcal` before its subcommand that take a value
_GLOBAL_WITH_VALUE = ("--log-level",)


class _Unsure(Exception):
    """The command line is not one this module is sure of: leave it all to the CLI."""


class _Peek(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Unsure(message)


def run_arguments(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``run`` when ``argv`` (without the program) runs a calibration,
    else None (another subcommand, ``--help``, ``--version``)."""
    args = list(argv)
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if any(g.startswith(flag) and len(flag) > 2 for g in _GLOBAL_WITH_VALUE) and args:
            args.pop(0)  # its value (--log-level=X is one token)
        elif flag in ("-h", "--help") or "--version".startswith(flag):
            return None
    if not args or args[0] != "run" or {"-h", "--help"} & set(args):
        return None
    return args[1:]


def prestart(argv: Sequence[str]) -> None:
    """Start the worker server of ``simcal run`` on a local cluster; nothing otherwise, and
    nothing when the command line is unclear (the CLI then starts it, or reports the error)."""
    args = run_arguments(argv)
    if args is None:
        return
    peek = _Peek(add_help=False)  # abbreviations as the CLI's parser allows them
    peek.add_argument("--config")
    peek.add_argument("--scheduler")
    try:
        known, _ = peek.parse_known_args(args)
    except _Unsure:
        return
    if known.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS"):
        return
    from simcal.workerstart import prestart_for_config

    prestart_for_config(known.config, early=True)


def entry() -> NoReturn:
    """The console script (and ``python -m simcal``)."""
    prestart(sys.argv[1:])
    from simcal.cli import entry as cli_entry

    cli_entry()
