"""A throwaway PostgreSQL (Debian's) inside the local cluster's network namespace, listening on
the node IP so that pods reach it, with a password-protected simcal role (scram-sha-256)."""

from __future__ import annotations

import contextlib
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pgserver import PostgresServer, postgres_bin

NETNS = "/run/netns/simcal-k8s"
NODE_IP = "10.200.0.2"
POD_CIDR = "10.244.0.0/16"
PORT = 15432


class NodePostgres(PostgresServer):
    """PostgresServer started inside the namespace on the node IP; pods may connect."""

    def url(self, *, password: str | None = None, database: str | None = None) -> str:
        return super().url(password=password, database=database).replace("127.0.0.1", NODE_IP)

    def start(self) -> None:
        options = (
            f"-c listen_addresses={NODE_IP} -p {self.port} -k {self.socket_dir} "
            "-c fsync=off -c synchronous_commit=off -c shared_buffers=16MB -c max_connections=50"
        )
        subprocess.run(
            ["nsenter", f"--net={NETNS}", "runuser", "-u", "postgres", "--",
             str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l",
             str(self.root / "server.log"), "-o", options, "-w", "-t", "60", "start"],
            capture_output=True, text=True, timeout=120, check=True, cwd=self.root,
        )

    def scalar(self, sql: str) -> object:
        """One value, as the superuser over the Unix socket (reachable from the host)."""
        import psycopg2

        connection = psycopg2.connect(host=str(self.socket_dir), port=self.port,
                                      user="postgres", dbname=self.database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchone()[0]
        finally:
            connection.close()


@contextlib.contextmanager
def node_postgres() -> Iterator[NodePostgres]:
    """initdb, allow the pod network (scram-sha-256), start in the namespace; stop, remove."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("no /usr/lib/postgresql/*/bin/initdb (Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="simcal-live-pg-"))
    server = NodePostgres(bin_dir, root, PORT)
    server.socket_dir.mkdir()
    account = pwd.getpwnam("postgres")
    (root / "pwfile").write_text("unused-superuser-password\n")
    for path in (root, server.socket_dir, root / "pwfile"):
        shutil.chown(path, account.pw_uid, account.pw_gid)
    try:
        server._run("initdb", "-D", str(server.data), "-U", "postgres", "-E", "UTF8",
                    "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256",
                    f"--pwfile={root / 'pwfile'}")
        with (server.data / "pg_hba.conf").open("a") as hba:
            # Pods (their own addresses) and the node (masqueraded traffic).
            hba.write(f"host all all {POD_CIDR} scram-sha-256\n")
            hba.write(f"host all all {NODE_IP}/32 scram-sha-256\n")
        server.start()
        server.admin(f"CREATE ROLE {server.user} LOGIN PASSWORD '{server.password}'")
        server.admin(f"CREATE DATABASE {server.database} OWNER {server.user}")
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
