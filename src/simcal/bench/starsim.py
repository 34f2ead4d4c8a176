"""``simcal bench --starsim``: Starsim's SIR calibration with simcal and with ss.Calibration.

Same model, data and likelihood (simcal.bench.starsim_sir), same budget (trials x
replicates) and the same number of worker processes. Each side runs as a user runs it, in
a fresh process: ``simcal run`` (a LocalCluster of W workers, the probe, the loop) then
``simcal posterior``; ``python -m simcal.bench.starsim_sir`` (``ss.Calibration`` with
``n_workers=W``). Runs alternate which side goes first per seed. Reported per run: wall
time of the process; for simcal its start-up (local cluster plus probe, from its log's
timestamps) and its time outside the loop (imports, start-up, summary, shutdown); best
parameters and their error against the truth; whether simcal's 90 % interval covers the
truth (Starsim gives no interval).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from simcal.bench import starsim_sir as sir

SIMCAL = [sys.executable, "-m", "simcal"]  # as the console script runs (simcal.launch)


def _env() -> dict[str, str]:
    env = {**os.environ, "STARSIM_INSTALL_FONTS": "0", "PYTHONUNBUFFERED": "1"}
    for name in ("DASK_SCHEDULER_ADDRESS", "SIMCAL_STORAGE"):
        env.pop(name, None)
    return env


def _run(argv: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env())
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:4])} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    return done, seconds


def _startup(log: str) -> float | None:
    """Seconds from "starting a local cluster" to the study's first line (cluster + probe),
    read from the timestamps of ``simcal run``'s log."""
    marks: dict[str, datetime] = {}
    for line in log.splitlines():
        for key, text in (("start", "starting a local cluster"), ("ready", "trials already done")):
            if text in line and key not in marks:
                marks[key] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    if len(marks) < 2:
        return None
    return round((marks["ready"] - marks["start"]).total_seconds(), 2)


def _errors(best: dict[str, float]) -> dict[str, float]:
    return {k: (best[k] - v) / v for k, v in sir.TRUE_PARAMS.items()}


def simcal_run(
    folder: Path, data: list, workers: int, trials: int, replicates: int, seed: int
) -> dict[str, Any]:
    """One ``simcal run`` and ``simcal posterior`` in ``folder``."""
    (folder / "data.csv").write_text(
        "t,infected,n\n" + "".join(f"{d},{x},{n}\n" for d, x, n in data)
    )
    config = {
        "study": f"starsim-sir-{seed}",
        "model": "simcal.bench.starsim_sir:simulate",
        "parameters": {k: {"low": lo, "high": hi} for k, (lo, hi) in sir.RANGES.items()},
        "replicates": replicates,
        "seed": seed,
        "targets": [
            {
                "name": "infected",
                "observed": "data.csv",
                "output": "prevalence",
                "loss": "beta_binomial_nll",
                "dispersion": float(sir.N_AGENTS + 2),
                "combine": "per_replicate",
            }
        ],
        "max_trials": trials,
        "storage": f"sqlite:///{folder / 'simcal.db'}",
    }
    path = folder / "calibration.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    summary = folder / "summary.json"
    ran, seconds = _run(
        [
            *SIMCAL,
            "run",
            "--config",
            str(path),
            "--workers",
            str(workers),
            "--metrics-port",
            "0",
            "--report-interval",
            "0",
            "--summary",
            str(summary),
        ],
        timeout=3600,
    )
    done = json.loads(summary.read_text())
    post_file = folder / "posterior.json"
    _run([*SIMCAL, "posterior", "--config", str(path), "--out", str(post_file)], timeout=600)
    posterior = json.loads(post_file.read_text())
    post = posterior["parameters"]
    covered = {k: post[k]["ci90"][0] <= v <= post[k]["ci90"][1] for k, v in sir.TRUE_PARAMS.items()}
    best = done["best_params"]
    return {
        "tool": "simcal",
        "seed": seed,
        "wall_seconds": round(seconds, 2),
        "startup_seconds": _startup(ran.stderr),
        "outside_loop_seconds": round(seconds - done["this_run"]["elapsed_seconds"], 2),
        "best_params": best,
        "relative_error": _errors(best),
        "best_loss": done["best_loss"],
        "trials": done["n_trials"],
        "ci90": {k: post[k]["ci90"] for k in sir.TRUE_PARAMS},
        "covered": covered,
        # the interval's footing: simcal warns below 30 and names the trials it would need
        "effective_sample_size": posterior.get("effective_sample_size"),
    }


def starsim_run(
    data: list, workers: int, trials: int, replicates: int, seed: int
) -> dict[str, Any]:
    """One ``ss.Calibration`` in a fresh process."""
    args = {
        "data": data,
        "workers": workers,
        "trials": trials,
        "replicates": replicates,
        "seed": seed,
    }
    done, seconds = _run(
        [sys.executable, "-m", "simcal.bench.starsim_sir", json.dumps(args)], timeout=3600
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    best = result["best_params"]
    return {
        "tool": "ss.Calibration",
        "seed": seed,
        "wall_seconds": round(seconds, 2),
        "calibrate_seconds": round(result["calibrate_seconds"], 2),
        "best_params": best,
        "relative_error": _errors(best),
        "best_loss": result["best_loss"],
        "trials": result["trials"],
    }


def default_workers() -> int:
    """Worker processes for both tools: 4, or the CPU count if smaller. ``ss.Calibration``
    runs its ``n_workers`` jobs in a pool of at most the CPU count (``sc.parallelize``): with
    4 on 2 CPUs it runs 2 processes at a time, so 4 for simcal would not be equal workers."""
    return max(1, min(4, os.cpu_count() or 1))


def compare(
    seeds: int,
    workers: int | None = None,
    trials: int = 100,
    replicates: int = 1,
    log: Any = print,
) -> dict[str, Any]:
    """Alternating runs over ``seeds`` seeds; every run and the medians per tool."""
    workers = workers or default_workers()
    data = sir.synthetic_data()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="simcal-starsim-") as tmp:
        for seed in range(1, seeds + 1):
            order = ("simcal", "starsim") if seed % 2 else ("starsim", "simcal")
            for tool in order:
                load = os.getloadavg()[0]
                if tool == "simcal":
                    folder = Path(tmp) / f"seed-{seed}"
                    folder.mkdir()
                    run = simcal_run(folder, data, workers, trials, replicates, seed)
                else:
                    run = starsim_run(data, workers, trials, replicates, seed)
                run["load_before"] = round(load, 1)
                runs.append(run)
                log(
                    f"{run['tool']} seed {seed}: {run['wall_seconds']} s, best {run['best_params']}"
                )
    return {
        "settings": {
            "workers": workers,
            "trials": trials,
            "replicates": replicates,
            "seeds": seeds,
            "truth": sir.TRUE_PARAMS,
            "data": data,
            "cpus": os.cpu_count(),
        },
        "runs": runs,
        "medians": _medians(runs),
    }


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for tool in ("simcal", "ss.Calibration"):
        mine = [r for r in runs if r["tool"] == tool]
        row = {"wall_seconds": statistics.median(r["wall_seconds"] for r in mine)}
        for name in sir.TRUE_PARAMS:
            row[f"abs_error_{name}"] = statistics.median(
                abs(r["relative_error"][name]) for r in mine
            )
        if tool == "simcal":
            row["startup_seconds"] = statistics.median(r["startup_seconds"] for r in mine)
            row["coverage"] = {
                n: sum(r["covered"][n] for r in mine) / len(mine) for n in sir.TRUE_PARAMS
            }
        out[tool] = row
    out["wall_ratio_simcal_over_starsim"] = round(
        out["simcal"]["wall_seconds"] / out["ss.Calibration"]["wall_seconds"], 3
    )
    return out


def to_markdown(result: dict[str, Any]) -> str:
    """The per-run table and the medians."""
    s = result["settings"]
    lines = [
        f"Starsim SIR: {s['trials']} trials x {s['replicates']} replicate(s), {s['workers']} "
        f"worker processes each, {s['seeds']} seeds, {s['cpus']} CPUs; truth {s['truth']}",
        "",
        "| run | seed | load | wall s | start-up s | outside loop s | beta (err) | gamma (err) "
        "| 90 % CI covers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        b, e = r["best_params"], r["relative_error"]
        cover = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r.get("covered", {}).items())
        if r.get("effective_sample_size") is not None:
            cover += f" (ESS {r['effective_sample_size']:.1f})"
        lines.append(
            f"| {r['tool']} | {r['seed']} | {r['load_before']} | {r['wall_seconds']} | "
            f"{r.get('startup_seconds', '')} | {r.get('outside_loop_seconds', '')} | "
            f"{b['beta']:.4f} ({e['beta']:+.0%}) | "
            f"{b['gamma']:.4f} ({e['gamma']:+.0%}) | {cover or 'no interval'} |"
        )
    m = result["medians"]
    lines += [
        "",
        "| median | wall s | start-up s | abs. error beta | abs. error gamma "
        "| runs whose 90 % CI covers |",
        "|---|---|---|---|---|---|",
    ]
    for tool in ("simcal", "ss.Calibration"):
        row = m[tool]
        coverage = row.get("coverage")
        shown = ", ".join(f"{k} {v:.0%}" for k, v in coverage.items()) if coverage else "none"
        lines.append(
            f"| {tool} | {row['wall_seconds']} | {row.get('startup_seconds', '')} | "
            f"{row['abs_error_beta']:.0%} | {row['abs_error_gamma']:.0%} | {shown} |"
        )
    lines += [
        "",
        f"simcal / ss.Calibration median wall time: {m['wall_ratio_simcal_over_starsim']}",
    ]
    return "\n".join(lines) + "\n"


def run_bench(
    out: Path, seeds: int, quick: bool = False, replicates: tuple[int, ...] = (5, 1)
) -> int:
    """``simcal bench --starsim SEEDS``: one comparison per replicate count (5: the issue's
    setup, where simcal runs a trial's replicates in parallel; 1: Starsim's page), written
    as starsim.json (``{"comparisons": [...]}``) and starsim.md into ``out``."""
    settings = {"workers": 2, "trials": 8} if quick else {}
    comparisons = [compare(seeds, replicates=r, **settings) for r in replicates]
    out.mkdir(parents=True, exist_ok=True)
    (out / "starsim.json").write_text(json.dumps({"comparisons": comparisons}, indent=2) + "\n")
    text = "\n".join(to_markdown(result) for result in comparisons)
    (out / "starsim.md").write_text(text)
    print(text)
    return 0
