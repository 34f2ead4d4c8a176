"""A throwaway PostgreSQL server on 127.0.0.1 for tests (Debian's postgresql binaries).

The server runs as the ``postgres`` system user when the tests run as root (initdb and
postgres refuse to run as root), with a password-protected role for simcal: TCP
connections use scram-sha-256, so a wrong password is refused for real.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb, or None."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
    )
    return candidates[-1].parent if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """A running server: its port, data directory, and the simcal role's credentials."""

    bin_dir: Path
    root: Path
    port: int
    user: str = "simcal"
    password: str = "pg-S3cret-7f3a9c"  # distinctive, so a leak is found by a plain search
    database: str = "simcal"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def url(self, *, password: str | None = None, database: str | None = None) -> str:
        """The SQLAlchemy URL of the simcal role (``password`` overrides the real one)."""
        secret = self.password if password is None else password
        return (
            f"postgresql+psycopg2://{self.user}:{secret}@{HOST}:{self.port}/"
            f"{database or self.database}"
        )

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=True, cwd=self.root
        )

    def start(self) -> None:
        options = (
            f"-c listen_addresses={HOST} -p {self.port} -k {self.socket_dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c shared_buffers=16MB -c max_connections=50"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def admin(self, sql: str, database: str = "postgres") -> None:
        """Run SQL as the superuser over the Unix socket (trusted locally)."""
        import psycopg2

        connection = psycopg2.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname=database
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql)
        finally:
            connection.close()

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a fresh server (initdb, start, create the simcal role and database); stop it."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("no /usr/lib/postgresql/*/bin/initdb (Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="simcal-pg-"))
    server = PostgresServer(bin_dir, root, _free_port())
    server.socket_dir.mkdir()
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        for path in (root, server.socket_dir):
            os.chown(path, account.pw_uid, account.pw_gid)
    (root / "pwfile").write_text("unused-superuser-password\n")
    if os.geteuid() == 0:
        os.chown(root / "pwfile", account.pw_uid, account.pw_gid)
    try:
        server._run(
            "initdb",
            "-D",
            str(server.data),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={root / 'pwfile'}",
        )
        server.start()
        server.admin(f"CREATE ROLE {server.user} LOGIN PASSWORD '{server.password}'")
        server.admin(f"CREATE DATABASE {server.database} OWNER {server.user}")
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop("immediate")
        time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
