"""A real one-node SLURM for tests: munged, slurmctld and slurmd from Debian's slurm-wlm.

Everything lives in one temporary folder (slurm.conf, munge key and socket, state and
spool directories, logs) and listens on 127.0.0.1 with free ports; no cgroup plugins
(proctrack/linuxproc, task/none), so it runs in a container as root. The node is named
``simcal-node`` whatever the host is called (``slurmd -N``). While the cluster runs,
``SLURM_CONF`` in this process points at its slurm.conf, so ``sbatch``/``squeue`` (and
dask-jobqueue, which calls them) talk to it. On exit every job is cancelled, the daemons
are stopped by process group, and any process still carrying this ``SLURM_CONF`` (a job's
``slurmstepd`` or its worker) is killed: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from processes import Proc, free_port, start, wait_until

NODE = "simcal-node"
PARTITION = "debug"
CPUS = 8  # more than this host has: slurmd takes the configured count (config_overrides)
DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_tools() -> list[str]:
    """The SLURM and munge programs this module needs that are not installed."""
    tools = [*DAEMONS, "sbatch", "squeue", "scancel", "sinfo"]
    return [tool for tool in tools if _which(tool) is None]


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


@dataclass
class Slurm:
    """A running one-node SLURM: its folder, slurm.conf and how to ask it about jobs."""

    root: Path
    conf: Path
    daemons: list[Proc]

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *argv: str, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster; its stdout (fails on error)."""
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=self.env()
        )
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def jobs(self) -> list[dict[str, str]]:
        """Jobs SLURM knows now (``squeue``): id, name, state and node list of each."""
        out = self.command("squeue", "--noheader", "--format=%i|%j|%T|%N")
        keys = ("id", "name", "state", "nodes")
        return [dict(zip(keys, line.split("|"), strict=True)) for line in out.split()]

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def _conf(root: Path, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=simcal-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / "munge.socket"}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "slurmctld.log"}
SlurmdLogFile={root / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=60
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={CPUS} RealMemory=8000 State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def slurm_cluster(root: Path, timeout: float = 90) -> Iterator[Slurm]:
    """Start munged, slurmctld and slurmd in ``root``; wait for the node to be idle."""
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"SLURM is not installed (missing {', '.join(missing)})")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # munged refuses a key or socket in a folder others can write
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, free_port(), free_port()), encoding="utf-8")
    env = {"SLURM_CONF": str(conf)}
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    slurm = Slurm(root, conf, [])
    try:
        munged = start(
            "munged",
            [
                _which("munged"), "--foreground", "--force", f"--socket={root / 'munge.socket'}",
                f"--key-file={key}", f"--pid-file={root / 'munged.pid'}",
                f"--log-file={root / 'munged.log'}", f"--seed-file={root / 'munged.seed'}",
            ],
            root,
            env,
        )
        slurm.daemons.append(munged)
        wait_until(lambda: _up(munged, root / "munge.socket"), 30, "munged's socket")
        slurm.daemons.append(start("slurmctld", [_which("slurmctld"), "-D", "-f", str(conf)],
                                   root, env))
        slurm.daemons.append(start("slurmd", [_which("slurmd"), "-D", "-f", str(conf),
                                              "-N", NODE], root, env))
        try:
            wait_until(lambda: _idle(slurm), timeout, f"SLURM node {NODE} to be idle", 0.5)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{slurm.logs()}") from None
        yield slurm
    finally:
        _stop(slurm)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def _up(proc: Proc, socket: Path) -> bool:
    assert proc.alive(), f"munged exited early:\n{proc.output()[-3000:]}"
    return socket.exists()


def _idle(slurm: Slurm) -> bool:
    for proc in slurm.daemons:
        assert proc.alive(), f"{proc.name} exited early:\n{proc.output()[-3000:]}\n{slurm.logs()}"
    done = subprocess.run(
        ["sinfo", "--noheader", "--nodes", NODE, "--format=%T"],
        capture_output=True, text=True, timeout=30, env=slurm.env(),
    )
    return done.returncode == 0 and done.stdout.strip() == "idle"


def _stop(slurm: Slurm) -> None:
    """Cancel every job, stop the daemons (process groups) and kill leftovers of this SLURM."""
    if any(proc.name == "slurmctld" and proc.alive() for proc in slurm.daemons):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(["scancel", "--full", f"--partition={PARTITION}"],
                           capture_output=True, timeout=30, env=slurm.env())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(AssertionError, subprocess.SubprocessError, OSError):
                if not slurm.jobs():
                    break
            time.sleep(0.5)
    for proc in reversed(slurm.daemons):
        proc.stop()
    for pid in _carrying(slurm.conf):  # job steps and workers outlive slurmd's group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _carrying(slurm.conf), 30, "every process of this SLURM to exit")


def _carrying(conf: Path) -> list[int]:
    """Pids of processes whose environment names ``conf`` as SLURM_CONF (not this one)."""
    marker = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            status = (entry / "stat").read_text()
        except OSError:
            continue
        if marker in environ.split(b"\0") and status.split(") ")[-1][:1] != "Z":
            found.append(int(entry.name))
    return found
