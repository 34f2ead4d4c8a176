"""Scale run (``simcal bench --scale``): one driver feeding many replicate slots, with the
scheduler in its own ``dask scheduler`` process as on Kubernetes.

Threaded workers (``dask worker --nworkers N --nthreads T``) sleep ``d`` seconds per
replicate; the driver (this process) uses the product's default storage (an SQLite file,
here in a temporary directory) and the default sampler (TPE). Reported: the steady rate and
its efficiency against the ideal ``60 * slots / (R * d)`` trials/min, the driver's CPU per
trial, the scheduler's CPU per task, and the driver's profile (top functions).
"""

from __future__ import annotations

import cProfile
import io
import logging
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from distributed import Client
from optuna.trial import FrozenTrial, TrialState

from simcal.bench.throughput import _Silent
from simcal.bench.workload import MODEL, PARAMS, steady_rate
from simcal.cluster import QUIET_DASK
from simcal.config import CalibrationConfig, validate_config
from simcal.driver import Calibration
from simcal.metrics import Metrics
from simcal.samplers import make_sampler
from simcal.service import SimulationService
from simcal.storage import open_study
from simcal.trials import SURPLUS, counted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleSettings:
    """The size of one scale run."""

    workers: int = 4
    threads: int = 64
    duration: float = 1.0
    replicates: int = 4
    trials: int = 2000
    profile_trials: int = 400  # a second, profiled run (cProfile slows the loop it measures)
    drivers: int = 1  # on one study: this process and drivers - 1 `simcal run` processes

    @property
    def slots(self) -> int:
        return self.workers * self.threads

    def ideal_trials_per_minute(self) -> float:
        return 60.0 * self.slots / (self.replicates * self.duration)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _quiet_env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in QUIET_DASK.items():
        env["DASK_" + key.upper().replace(".", "__").replace("-", "_")] = str(value)
    return env


def _config(settings: ScaleSettings, storage: str, study: str = "") -> CalibrationConfig:
    return validate_config(
        {
            "study": study or f"scale-{settings.slots}",
            "model": MODEL,
            "model_options": {"duration": settings.duration},
            "parameters": {name: {"low": 0.0, "high": 1.0} for name in PARAMS},
            "replicates": settings.replicates,
            "targets": [{"name": "y", "observed": "simcal.models.synthetic:observed"}],
            "max_trials": settings.profile_trials if study else settings.trials,
            "trial_timeout": max(600.0, 20 * settings.duration * settings.replicates),
            "storage": storage,
        }
    )


def _other_drivers(
    settings: ScaleSettings, config: CalibrationConfig, address: str, directory: str,
    env: dict[str, str],
) -> list[subprocess.Popen]:
    """Start ``settings.drivers - 1`` more drivers on the same study: ``simcal run`` processes
    with the same config, storage and scheduler (as several Kubernetes driver pods)."""
    if settings.drivers <= 1:
        return []
    import yaml

    path = Path(directory) / "scale.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    simcal = str(Path(sys.executable).with_name("simcal"))
    return [
        subprocess.Popen(
            [
                simcal, "run", "--config", str(path), "--scheduler", address,
                "--min-workers", str(settings.workers), "--metrics-port", "0",
                "--summary", str(Path(directory) / f"driver-{index}.json"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(Path(directory) / f"driver-{index}.log", "w"),
            start_new_session=True,
        )
        for index in range(1, settings.drivers)
    ]


def _wait_for_leases(
    study: Any, count: int, others: list[subprocess.Popen], timeout: float = 300
) -> None:
    """Wait until ``count`` other drivers hold a lease on the study (all drive at once)."""
    from simcal.optuna_internals import study_system_attrs
    from simcal.trials import LEASE_PREFIX

    deadline = time.monotonic() + timeout
    while count:
        leases = [k for k in study_system_attrs(study) if k.startswith(LEASE_PREFIX)]
        if len(leases) >= count:
            return
        if any(proc.poll() is not None for proc in others) or time.monotonic() > deadline:
            raise RuntimeError("the other scale drivers did not start (see their logs)")
        time.sleep(0.2)


def _reap(others: list[subprocess.Popen], directory: str) -> tuple[float, list[dict[str, Any]]]:
    """Wait for the other drivers; their CPU seconds (together) and their summaries."""
    import json
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for proc in others:
        if proc.wait(timeout=600) != 0:
            log_text = (Path(directory) / f"driver-{others.index(proc) + 1}.log").read_text()
            raise RuntimeError(f"a scale driver exited {proc.returncode}: {log_text[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summaries = [
        json.loads((Path(directory) / f"driver-{index}.json").read_text())
        for index in range(1, len(others) + 1)
    ]
    return cpu, summaries


def told_trials(trials: list[FrozenTrial]) -> tuple[list[FrozenTrial], int, int]:
    """The completed trials, how many were told as the budget counts them, and how many are
    surplus: asked over the budget in a race between drivers, never run, not counted (the
    drivers' own stats leave them out too)."""
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    told = sum(1 for t in trials if counted(t))
    return completed, told, sum(1 for t in trials if t.user_attrs.get(SURPLUS))


def scale_run(settings: ScaleSettings, out: Path) -> dict[str, Any]:
    """Start the scheduler and workers as processes, run the driver here, measure."""
    dask = str(Path(sys.executable).with_name("dask"))
    port = _free_port()
    env = _quiet_env()
    procs: list[subprocess.Popen] = []
    directory = tempfile.mkdtemp(prefix="simcal-scale-")
    try:
        scheduler = subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(scheduler)
        address = f"tcp://127.0.0.1:{port}"
        procs.append(
            subprocess.Popen(
                [
                    dask,
                    "worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--nworkers",
                    str(settings.workers),
                    "--nthreads",
                    str(settings.threads),
                    "--memory-limit",
                    "0",
                    "--no-dashboard",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        default = str(CalibrationConfig.model_fields["storage"].default)
        storage = default.replace("sqlite:///", f"sqlite:///{directory}/", 1)
        config = _config(settings, storage)
        with Client(address, timeout=120) as client:
            client.wait_for_workers(settings.workers, timeout=300)
            study = open_study(storage, config.study, make_sampler(config.sampler, config.seed))
            calibration = Calibration(
                config, SimulationService(client), study, Metrics(config.study), progress=_Silent()
            )
            others = _other_drivers(settings, config, address, directory, env)
            _wait_for_leases(study, len(others), others)
            sched = psutil.Process(scheduler.pid)
            sched_cpu = sum(sched.cpu_times()[:2])
            cpu, wall = time.process_time(), time.perf_counter()
            stats = calibration.run()
            own_cpu = time.process_time() - cpu
            others_cpu, summaries = _reap(others, directory)
            cpu, wall = own_cpu + others_cpu, time.perf_counter() - wall
            sched_cpu = sum(sched.cpu_times()[:2]) - sched_cpu
            completed, told, surplus = told_trials(study.get_trials(deepcopy=False))
            times = [t.datetime_complete.timestamp() for t in completed]
            log.info(
                "scale run: %d trials in %.0f s; profiling %d more",
                len(times),
                wall,
                settings.profile_trials,
            )
            profiled = _config(settings, storage, study=f"scale-{settings.slots}-profile")
            profiler = cProfile.Profile()
            second = Calibration(
                profiled,
                SimulationService(client),
                open_study(storage, profiled.study, make_sampler(profiled.sampler, 1)),
                Metrics(profiled.study),
                progress=_Silent(),
            )
            profiler.enable()
            second.run()
            profiler.disable()
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(directory, ignore_errors=True)
    tasks = told * (settings.replicates + 1)
    rate = steady_rate(times) * 60
    text = io.StringIO()
    text.write(
        f"cProfile of the driver's main thread over a second run of {settings.profile_trials}"
        " trials (the measured run is not profiled)\n"
    )
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    out.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(out / "scale-profile.prof")
    (out / "scale-profile.txt").write_text(text.getvalue())
    return {
        **settings.__dict__,
        "slots": settings.slots,
        "completed": len(completed),
        "failed": told - len(completed),
        "surplus": surplus,
        "told_by_driver": [stats.completed + stats.failed]
        + [s["this_run"]["completed"] + s["this_run"]["failed"] for s in summaries],
        "elapsed_seconds": round(wall, 1),
        "trials_per_minute": round(rate, 1),
        "ideal_trials_per_minute": settings.ideal_trials_per_minute(),
        "efficiency": rate / settings.ideal_trials_per_minute(),
        "driver_cpu_ms_per_trial": 1000 * cpu / max(told, 1),
        "scheduler_cpu_ms_per_task": 1000 * sched_cpu / max(tasks, 1),
        "load_average_end": os.getloadavg(),
        "profile": str(out / "scale-profile.txt"),
    }
