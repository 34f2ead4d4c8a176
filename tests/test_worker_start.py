"""How a local cluster's workers start: forked from one server that imported the model once.

Real LocalClusters (2 workers), real multiprocessing forkserver; no mocks.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import psutil
import pytest

from simcal import workerstart as cluster
from simcal.cluster import ClusterOptions, connect
from simcal.configfile import peek_model
from simcal.shipping import installed_imports, source_imports
from simcal.workerstart import prestart_workers, stop_prestarted_workers

ROOT = Path(__file__).resolve().parents[1]
# installed, not imported by distributed or simcal.tasks: visible only if preloaded
MARKER = "simcal.models.seir"


def _options(**kw: object) -> ClusterOptions:
    return ClusterOptions(workers=2, dashboard_address="127.0.0.1:0", **kw)


def _worker_facts(client: object) -> list[tuple[int, bool]]:
    """(parent pid, MARKER already imported) of every worker, before any task ran."""
    def facts() -> tuple[int, bool]:
        return os.getppid(), MARKER in sys.modules

    return list(client.run(facts).values())  # type: ignore[attr-defined]


def _worker_gc(client: object) -> list[tuple[bool, int]]:
    """(collection on, objects in the permanent generation) of every worker."""
    def facts() -> tuple[bool, int]:
        return gc.isenabled(), gc.get_freeze_count()

    return list(client.run(facts).values())  # type: ignore[attr-defined]


def _new_children(before: set[int]) -> list[str]:
    return [
        " ".join(p.cmdline())
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        and "resource_tracker" not in " ".join(p.cmdline())
    ]


@pytest.fixture
def spawn_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD", "spawn")


def test_workers_are_forked_from_a_server_that_imported_the_preload_once() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with connect(_options(preload=(MARKER,))) as client:
        server = cluster._forkserver_pid()
        assert server is not None and server != os.getpid()
        facts = _worker_facts(client)
        assert facts == [(server, True), (server, True)], facts
        # what the server imported is frozen (distributed alone is over 100,000 objects),
        # and collection is on again in the workers
        collection = _worker_gc(client)
        assert all(on and frozen > 100_000 for on, frozen in collection), collection
    # the cluster's close stops the server too: nothing outlives it
    assert cluster._forkserver_pid() is None
    assert not _new_children(before)


def test_the_local_clusters_dask_processes_run_their_idle_work_at_the_quiet_intervals() -> None:
    """QUIET_DASK reaches the scheduler and the nannies (in the driver) and the workers (forked):
    no profiler, 1 s ticks and memory monitors, a 2 s system monitor without disk counters."""
    def facts(server: object) -> dict[str, object]:
        timers = server.periodic_callbacks  # type: ignore[attr-defined]
        return {
            "tick ms": timers["tick"].callback_time,
            "system monitor ms": timers["monitor"].callback_time,
            "disk counters": server.monitor.monitor_disk_io,  # type: ignore[attr-defined]
            "profiler": "profile" in timers,
            "memory monitor ms": getattr(timers.get("memory_monitor"), "callback_time", None),
        }

    quiet = {"tick ms": 1000, "system monitor ms": 2000, "disk counters": False, "profiler": False}
    with connect(_options()) as client:
        workers = list(client.run(lambda dask_worker: facts(dask_worker)).values())
        scheduler = client.run_on_scheduler(lambda dask_scheduler: facts(dask_scheduler))
        nannies = list(client.run(lambda dask_worker: facts(dask_worker), nanny=True).values())
    assert workers == [{**quiet, "memory monitor ms": 1000}] * 2, workers
    assert nannies == [{**quiet, "memory monitor ms": 1000}] * 2, nannies
    assert {k: scheduler[k] for k in quiet} == quiet, scheduler


def test_a_start_method_the_user_chose_wins(spawn_chosen: None) -> None:
    with connect(_options(preload=(MARKER,))) as client:
        assert cluster._forkserver_pid() is None
        facts = _worker_facts(client)
        collection = _worker_gc(client)
    # spawned by the driver's nannies: children of this process, MARKER not imported
    assert facts == [(os.getpid(), False), (os.getpid(), False)], facts
    assert collection == [(True, 0), (True, 0)], collection  # nothing frozen in spawned ones


def test_the_server_imports_with_collection_off_and_freezes_what_it_imported_last() -> None:
    order = cluster._preload_list([MARKER, cluster.GC_FROZEN, "distributed"])
    assert order == [
        cluster.GC_OFF, "distributed", "simcal.tasks", "simcal.workersignals", MARKER,
        cluster.GC_FROZEN,
    ]


def test_a_prestarted_server_is_adopted_by_the_cluster_and_stopped_with_it() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    prestart_workers([MARKER])
    server = cluster._forkserver_pid()
    assert server is not None
    with connect(_options()) as client:  # no preload of its own: the prestarted one is used
        assert _worker_facts(client) == [(server, True), (server, True)]
    assert cluster._forkserver_pid() is None
    stop_prestarted_workers()  # nothing left to stop: a no-op
    assert not _new_children(before)


def test_a_prestarted_server_no_cluster_adopted_is_stopped() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    prestart_workers([MARKER])
    assert cluster._forkserver_pid() is not None
    stop_prestarted_workers()
    assert cluster._forkserver_pid() is None
    assert not _new_children(before)


def test_prestart_is_a_no_op_where_the_user_chose_the_start_method(spawn_chosen: None) -> None:
    prestart_workers([MARKER])
    assert cluster._forkserver_pid() is None


def test_source_imports_reads_a_local_model_without_importing_it(tmp_path: Path) -> None:
    (tmp_path / "mymodel.py").write_text(
        "import json\nimport numpy as np\nfrom simcal.models import seir\nfrom . import x\n"
        "import mylocalhelper\ntry:\n    import scipy.special\nexcept ImportError:\n    pass\n"
        "\ndef simulate(params, seed):\n    import pandas\n"
    )
    (tmp_path / "mylocalhelper.py").write_text("")
    found = source_imports("mymodel:simulate", tmp_path)
    # installed packages its import runs (also in a try), not those imported inside functions;
    # not the standard library, not local code (which is shipped), not the model module itself
    assert found == ["numpy", "simcal.models", "scipy.special"], found
    assert "mymodel" not in sys.modules
    # an installed model module is preloaded itself
    assert source_imports("simcal.models.seir:simulate") == ["simcal.models.seir", "numpy"]
    assert source_imports("nosuchmodule:f") == []


def test_installed_imports_of_a_notebook_function() -> None:
    import numpy as np
    import yaml

    namespace = {"np": np, "json": __import__("json"), "yaml": yaml, "__name__": "__main__"}
    exec(
        "def simulate(params, seed):\n    def inner():\n        return np.zeros(3)\n"
        "    return {'y': inner(), 'z': json.dumps(1)}",
        namespace,
    )
    # what its code uses (nested code too), installed: numpy; not yaml, only in the namespace
    assert installed_imports(namespace["simulate"]) == ["numpy"]
    assert installed_imports("simcal.models.seir:simulate") == ["simcal.models.seir", "numpy"]
    from simcal.models.seir import simulate  # a function of an installed module: its module

    assert installed_imports(simulate) == ["simcal.models.seir", "numpy"]


def test_peek_model_reads_the_reference_without_validating(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model: mymodel:simulate\nparameters: not even a mapping\n")
    assert peek_model(config) == "mymodel:simulate"
    config.write_text("model: [1, 2\n")
    assert peek_model(config) is None
    assert peek_model(tmp_path / "missing.yaml") is None
    assert peek_model(ROOT / "examples" / "starsim-sir" / "calibration.yaml") == "sir:simulate"


def _demo_run_log(tmp_path: Path) -> str:
    """The DEBUG log of ``simcal run`` of 3 trials of the demo on 2 local workers."""
    from conftest import run_simcal

    done = run_simcal(
        "--log-level", "DEBUG", "run", "--workers", "2", "--max-trials", "3",
        "--storage", f"sqlite:///{tmp_path / 's.db'}", "--metrics-port", "0",
        "--dashboard-address", "127.0.0.1:0", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_simcal_run_starts_the_worker_server_before_reading_its_config(tmp_path: Path) -> None:
    log = _demo_run_log(tmp_path)
    started = log.index("worker server")
    # the demo's model module and numpy, named from its source before the config was read,
    # and before the CLI loaded (simcal.launch: the console script's first step)
    line = log[started:].splitlines()[0]
    assert "started before the CLI loaded, importing simcal.models.seir, numpy" in line, line
    assert started < log.index("starting a local cluster")


def test_a_start_method_chosen_in_a_dask_config_file_stops_the_early_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console script starts the server before it imports Dask (0.1 s sooner), so it cannot
    see a Dask config file yet; the CLI reads it and stops that server before the cluster
    starts, whose workers then start as the file says."""
    config = tmp_path / "dask-config"
    config.mkdir()
    (config / "start.yaml").write_text(
        "distributed:\n  worker:\n    multiprocessing-method: spawn\n", encoding="utf-8"
    )
    monkeypatch.setenv("DASK_CONFIG", str(config))
    log = _demo_run_log(tmp_path)
    assert "stopped: not used" in log, log[-3000:]
    assert log.index("stopped: not used") < log.index("starting a local cluster")
    assert "trials 3/3" in log, log[-2000:]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--config", "c.yaml"], ["--config", "c.yaml"]),
        (["--log-level", "DEBUG", "run"], []),
        (["--log", "DEBUG", "run", "--workers", "2"], ["--workers", "2"]),
        (["--log-level=DEBUG", "run"], []),
        (["run", "--help"], None),
        (["--help"], None),
        (["--version"], None),
        (["results", "--config", "c.yaml"], None),
        ([], None),
    ],
)
def test_the_launcher_reads_which_command_lines_run_a_calibration(
    argv: list[str], expected: list[str] | None
) -> None:
    from simcal.launch import run_arguments

    assert run_arguments(argv) == expected


def test_a_run_command_line_the_cli_refuses_leaves_no_worker_server(tmp_path: Path) -> None:
    """The launcher starts the server before the CLI reads the command line in full: when the
    CLI then refuses it (exit 2), the server is stopped with it, not left importing."""
    import subprocess
    import uuid

    # a model whose installed import (Starsim: over a second) keeps a server busy
    (tmp_path / "slowmodel.py").write_text("import starsim\n\ndef simulate(p, seed): ...\n")
    config = tmp_path / "calibration.yaml"
    config.write_text("model: slowmodel:simulate\n", encoding="utf-8")
    mark = uuid.uuid4().hex
    # output to a file, not a pipe: a server left behind would hold a pipe open, and reading
    # it to its end would wait for that server to exit
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "simcal", "run", "--config", str(config), "--workers", "none"],
            stdout=subprocess.DEVNULL, stderr=stderr, timeout=60, check=False,
            env={**os.environ, "SIMCAL_TEST_MARK": mark},
        )
        stderr.seek(0)
        said = stderr.read()
    assert done.returncode == 2, said
    assert "argument --workers" in said
    assert "Traceback" not in said

    def marked(process: psutil.Process) -> bool:
        try:
            return process.environ().get("SIMCAL_TEST_MARK") == mark
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    assert [p.cmdline() for p in psutil.process_iter() if marked(p)] == []


SHUTDOWN_NOISE = """
import logging
from simcal.cluster import ClusterOptions, connect

def log_in_worker() -> None:
    log = logging.getLogger("distributed.worker")
    try:
        raise OSError("Stream is closed")
    except OSError:  # what a heartbeat in flight logs when the driver closes the scheduler
        log.exception("Failed to communicate with scheduler during heartbeat.")
        log.exception("a worker error that is not shutdown noise")

if __name__ == "__main__":
    with connect(ClusterOptions(workers=1, dashboard_address="127.0.0.1:0")) as client:
        client.run(log_in_worker)
"""


def test_a_local_workers_heartbeat_cut_by_the_clusters_close_logs_no_traceback(
    tmp_path: Path,
) -> None:
    """dask/distributed#7105: closing a LocalCluster can catch a heartbeat in flight; the
    worker then logs a traceback on the user's terminal. Other worker errors still show."""
    import subprocess

    script = tmp_path / "noise.py"
    script.write_text(SHUTDOWN_NOISE, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "a worker error that is not shutdown noise" in result.stderr
    assert "during heartbeat" not in result.stderr, result.stderr
