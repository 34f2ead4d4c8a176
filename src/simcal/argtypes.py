"""Argument handling shared by the ``simcal`` subcommands: value types and the help format."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simcal.config import CalibrationConfig


def number(text: str, kind: type[int] | type[float]) -> Any:
    """``text`` as ``kind``; an argparse error naming what was expected otherwise."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--study`` and ``--storage``: which study, of every study subcommand."""
    from pathlib import Path

    parser.add_argument("--config", type=Path, help="calibration YAML (default: the SEIR demo)")
    parser.add_argument("--study", help="study name (overrides the config)")
    parser.add_argument(
        "--storage",
        help="SQLAlchemy URL of the Optuna storage (default: $SIMCAL_STORAGE, then the config)",
    )


def resolve_study_config(args: argparse.Namespace, **overrides: Any) -> CalibrationConfig:
    """The config those arguments name (the SEIR demo without ``--config``), with ``--study``
    and ``--storage`` (else ``$SIMCAL_STORAGE``) and ``overrides`` applied.

    One rule for paths: a relative SQLite path in ``--storage`` or ``$SIMCAL_STORAGE`` is the
    current directory's; one in the config file's ``storage`` is the config's folder's (as
    its data paths are); the demo's default ``sqlite:///simcal.db`` is the current directory's.
    """
    import os
    from pathlib import Path

    from simcal.config import demo_config, load_config, resolve_sqlite_path

    storage = args.storage or os.environ.get("SIMCAL_STORAGE")
    overrides["study"] = args.study
    overrides["storage"] = storage and resolve_sqlite_path(storage, Path.cwd())
    if args.config is None:
        return demo_config(overrides)
    return load_config(args.config, overrides)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless it has none or its help names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default == argparse.SUPPRESS
            or "default" in text
            or not action.option_strings
        ):
            return action.help
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose help shows defaults; subcommands' parsers are one too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
