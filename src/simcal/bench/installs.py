"""Install comparison (``simcal bench --installs``): the same workload run by several Python
environments (say the constraints venv and one made by a plain ``pip install .``), paired.

Each install runs in its own process (``python -m simcal.bench.installs``): a local cluster
of W workers and one streaming calibration on the default storage (an SQLite file) with the
default sampler, as ``simcal bench --storages default`` does. The installs alternate within
every round (A B, then B A), so load on a shared machine hits them alike. Reported per
install: the median efficiency over rounds, its Optuna version, the fast path its runs took
(:func:`simcal.optuna_internals.fast_path`); and each install's median relative to the
first one's.

Which simcal runs is each environment's own, or the one ``$PYTHONPATH`` names (inherited):
with ``PYTHONPATH=src`` every install runs this checkout's code on its own dependencies.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from simcal.bench.markdown import markdown_table

log = logging.getLogger(__name__)

EFFICIENCY_TARGET = 0.92  # W=8, R=5, d=0.05 s, default storage (issue 18), every install
RATIO_TARGET = 0.95  # each install's median over the first one's


def parse_installs(text: str) -> dict[str, str]:
    """``name=python,name=python`` (a ``python`` alone is named after its venv directory)."""
    installs: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, python = item.partition("=")
        if not sep:
            python = name
            name = os.path.basename(os.path.dirname(os.path.dirname(python))) or python
        if not os.access(python, os.X_OK):
            raise ValueError(f"{python!r} is not an executable Python")
        if name in installs:
            raise ValueError(f"install {name!r} given twice")
        installs[name] = python
    if len(installs) < 2:
        raise ValueError("give at least two installs: name=/path/to/python,name=/path/to/python")
    return installs


def compare_installs(
    installs: dict[str, str],
    *,
    workers: int = 8,
    duration: float = 0.05,
    replicates: int = 5,
    seconds: float = 8.0,
    rounds: int = 3,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Run every install ``rounds`` times, alternating; returns rows, medians and ratios."""
    rows: list[dict[str, Any]] = []
    load_start = os.getloadavg()
    names = list(installs)
    for round_ in range(rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            row = _run_one(installs[name], workers, duration, replicates, seconds, timeout)
            rows.append({**row, "install": name, "round": round_})
            log.info(
                "install %s (Optuna %s, fast_path %s): efficiency %.3f",
                name, row["optuna"], row["fast_path"]["storage"] and row["fast_path"]["sampler"],
                row["efficiency"],
            )
    summary = []
    for name in names:
        mine = [r for r in rows if r["install"] == name]
        summary.append(
            {
                "install": name,
                "python": installs[name],
                "optuna": mine[0]["optuna"],
                "simcal": mine[0]["simcal"],
                "fast_path": all(r["fast_path"]["storage"] and r["fast_path"]["sampler"]
                                 for r in mine),
                "efficiency": statistics.median(r["efficiency"] for r in mine),
                "efficiencies": [round(r["efficiency"], 3) for r in mine],
                "driver_cpu_ms_per_trial": 1000
                * statistics.median(r["driver_cpu_seconds_per_trial"] for r in mine),
            }
        )
    baseline = summary[0]["efficiency"]
    for entry in summary:
        entry["ratio"] = entry["efficiency"] / baseline if baseline else None
        entry["met"] = entry["efficiency"] >= EFFICIENCY_TARGET and (
            entry["ratio"] is not None and entry["ratio"] >= RATIO_TARGET
        )
    return {
        "workers": workers,
        "duration": duration,
        "replicates": replicates,
        "seconds": seconds,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "rows": rows,
        "summary": summary,
    }


def _run_one(
    python: str, workers: int, duration: float, replicates: int, seconds: float, timeout: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="simcal-installs-") as directory:
        out = os.path.join(directory, "row.json")
        command = [
            python, "-m", "simcal.bench.installs", out,
            str(workers), str(duration), str(replicates), str(seconds),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"{python} failed (exit {result.returncode}):\n{tail}")
        with open(out, encoding="utf-8") as handle:
            return json.load(handle)


def measure_here(workers: int, duration: float, replicates: int, seconds: float) -> dict[str, Any]:
    """One streaming run on the default storage in this environment (the child's side)."""
    import optuna

    import simcal
    from simcal.bench.storages import compare_storages
    from simcal.optuna_internals import fast_path
    from simcal.samplers import make_sampler
    from simcal.storage import open_study

    result = compare_storages(
        ["default"], workers=workers, durations=(duration,), replicates=replicates,
        seconds=seconds, rounds=1,
    )
    with tempfile.TemporaryDirectory(prefix="simcal-installs-") as directory:
        study = open_study(f"sqlite:///{directory}/paths.db", "paths", make_sampler("tpe", 0))
        paths = fast_path(study)
    row = result["rows"][0]
    return {
        **row,
        "optuna": optuna.__version__,
        "simcal": simcal.__file__,
        "fast_path": paths,
    }


def installs_markdown(result: dict[str, Any]) -> str:
    """The comparison as a markdown table, with the load averages around it."""
    start = " ".join(f"{x:.2f}" for x in result["load_average_start"])
    end = " ".join(f"{x:.2f}" for x in result["load_average_end"])
    table = markdown_table(
        result["summary"],
        [
            ("install", lambda r: r["install"]),
            ("Optuna", lambda r: r["optuna"]),
            ("fast path", lambda r: r["fast_path"]),
            ("efficiency (median)", lambda r: round(r["efficiency"], 3)),
            ("rounds", lambda r: ", ".join(f"{e:.3f}" for e in r["efficiencies"])),
            ("ratio to first", lambda r: None if r["ratio"] is None else round(r["ratio"], 3)),
            ("driver CPU ms/trial", lambda r: round(r["driver_cpu_ms_per_trial"], 1)),
            (f"met (>= {EFFICIENCY_TARGET}, ratio >= {RATIO_TARGET})", lambda r: r["met"]),
        ],
    )
    setting = (
        f"W={result['workers']}, R={result['replicates']}, d={result['duration']} s, default "
        f"storage, streaming, {result['seconds']} s per run"
    )
    return (
        f"# simcal bench --installs\n\n{setting}; load average {start} -> {end}\n\n{table}\n"
    )


def main(argv: list[str]) -> int:
    """``python -m simcal.bench.installs OUT W d R SECONDS``: one measurement, as JSON."""
    from simcal.bench.cli import QUIET_LOGGERS

    logging.basicConfig(level=logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    out, workers, duration, replicates, seconds = argv
    row = measure_here(int(workers), float(duration), int(replicates), float(seconds))
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(row, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
