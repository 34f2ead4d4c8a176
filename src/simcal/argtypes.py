"""Argument types shared by the ``simcal`` subcommands: one definition of each check."""

from __future__ import annotations

import argparse
from typing import Any


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
