"""A throw-away PostgreSQL cluster for the tests and the overhead benchmark
(benchmarks/gateway_overhead.py imports this file, so both start a cluster
the same way).

`initdb` into a fresh temporary folder, then the server on 127.0.0.1 at a
free port (and a Unix socket in that folder), started with `pg_ctl`. The
server refuses to run as root, so under root every PostgreSQL command runs
as the `postgres` OS user (the Debian package creates it) and the folder is
handed to it. Authentication: trust for the superuser `specdrift` on
loopback; the role `secured` needs its password (scram-sha-256). `stop()`
ends the server by the PID in postmaster.pid and removes the folder.

`postgres_cluster` is a session fixture, `postgres_database` a fresh database
of it per test; a test module imports them."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from core.processes import free_port

SUPERUSER = "specdrift"
DATABASE = "specdrift"
PASSWORD_ROLE = "secured"
STOP_WAIT_S = 30.0
_databases = itertools.count()


def postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresCluster:
    def __init__(self, bin_dir: Path, port: int | None = None, durable: bool = False):
        """`durable`: fsync as a production server does (the benchmark); off, the tests' throw-away default."""
        self.bin = bin_dir
        self.port = port or free_port()
        self.durable = durable
        self.as_postgres = os.geteuid() == 0
        # Not under pytest's tmp folders: their parents are root's alone, which the postgres user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="specdrift-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    def url_as(self, role: str, database: str = DATABASE) -> str:
        return f"postgresql://{role}@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120, cwd=self.root)

    def init(self) -> "PostgresCluster":
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                  "--locale=C", *([] if self.durable else ["--no-sync"]))
        # Checked first to last: the password role over TCP needs its password; everyone else is trusted.
        (self.data / "pg_hba.conf").write_text(
            f"local all all trust\n"
            f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
            f"host all all 127.0.0.1/32 trust\n")
        self.start()
        self.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
        return self

    def start(self) -> None:
        """Start the server (again: the same port and data)."""
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop_fast(self) -> None:
        """`pg_ctl stop -m fast`: sessions cut, the port closed until start()."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def psql(self, sql: str, database: str = DATABASE) -> str:
        return self._run("psql", "-h", str(self.root), "-p", str(self.port), "-U", SUPERUSER, "-d", database,
                         "-v", "ON_ERROR_STOP=1", "-Atc", sql).stdout

    def add_password_role(self, password: str) -> str:
        """The role `secured` with `password` (scram), owning its own database; returns its URL."""
        escaped = password.replace("'", "''")
        self.psql(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{escaped}'")
        self.psql(f"CREATE DATABASE {PASSWORD_ROLE} OWNER {PASSWORD_ROLE}", database="postgres")
        return self.url_as(PASSWORD_ROLE, PASSWORD_ROLE)

    def server_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """End the server by its PID (SIGINT: PostgreSQL's fast shutdown), then remove the folder."""
        pid = self.server_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGINT)
                deadline = time.monotonic() + STOP_WAIT_S
                while time.monotonic() < deadline and _running(pid):
                    time.sleep(0.05)
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an ended server whose parent, init here, has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_cluster(durable: bool = False) -> PostgresCluster:
    """A running cluster; RuntimeError if no PostgreSQL binaries are installed."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql")
    cluster = PostgresCluster(bin_dir, durable=durable)
    try:
        return cluster.init()
    except BaseException:
        cluster.stop()
        raise


@pytest.fixture(scope="session")
def postgres_cluster():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
                    "install the Debian package `postgresql`")
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_database(postgres_cluster) -> str:
    """A fresh, empty database of the session's cluster, for one test: its URL (the trusted superuser)."""
    name = f"test_{os.getpid()}_{next(_databases)}"
    postgres_cluster.psql(f"CREATE DATABASE {name}", database="postgres")
    return postgres_cluster.url_as(SUPERUSER, name)
