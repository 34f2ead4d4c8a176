"""What the monitoring tests share: promtool and the alert names the design fixes."""

from __future__ import annotations

import shutil

import pytest

# The alert names of the design brief (DESIGN.md, "Alert names").
DESIGN_ALERTS = {
    "SimcalThroughputRegression",
    "SimcalLowWorkerUtilization",
    "SimcalHighErrorRate",
    "SimcalNoProgress",
    "SimcalWorkersBelowMinimum",
    "SimcalDriverDown",
    "SimcalDriverSaturated",
}


def promtool() -> str:
    """The promtool binary (Debian's `prometheus` package, installed by `make test`)."""
    path = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin")
    if path is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (make system-deps)")
    return path
