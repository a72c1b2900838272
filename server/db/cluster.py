"""A throwaway PostgreSQL cluster in a temp folder, for tests and ``facegate bench fleet``.

It runs the binaries of the Debian ``postgresql`` package (``/usr/lib/postgresql/<ver>/bin``; elsewhere
``initdb`` on PATH, or ``FACEGATE_PG_BINDIR``). PostgreSQL refuses to run as root, so as root the
cluster's folder is handed to the ``postgres`` system user and every binary runs through
``runuser -u postgres --``. The cluster listens on loopback only, trusts local connections and is
deleted on :meth:`LocalPostgres.close`: it is never a production database.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from server.broker import free_port

logger = logging.getLogger(__name__)

PG_USER = "postgres"  # the system user the Debian package creates
DB_NAME = "facegate"
DB_ROLE = "facegate"
START_TIMEOUT_S = 120  # pg_ctl -w waits this long for the server to accept connections
COMMAND_TIMEOUT_S = 300


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or no way to run them (root without a ``postgres`` user)."""


class PostgresStartError(RuntimeError):
    """initdb or the server failed; the message names the log."""


def postgres_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: FACEGATE_PG_BINDIR, the newest Debian version, or PATH."""
    env = os.environ.get("FACEGATE_PG_BINDIR")
    if env:
        return Path(env) if (Path(env) / "initdb").is_file() else None
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def unavailable_reason() -> str | None:
    """Why a throwaway cluster cannot start here, or None when it can."""
    if postgres_bindir() is None:
        return "PostgreSQL binaries not installed (apt install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    return None


class LocalPostgres:
    """A PostgreSQL server on ``127.0.0.1:port`` with one database, ``facegate``; a context manager.

    ``durable=False`` turns fsync off (tests: faster, and a lost cluster costs nothing). The SQLAlchemy
    URL is :attr:`url` (psycopg 3 driver).
    """

    def __init__(self, port: int | None = None, durable: bool = False, max_connections: int = 200) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise PostgresUnavailable(reason)
        bindir = postgres_bindir()
        assert bindir is not None  # noqa: S101 - unavailable_reason checked it
        self.bindir = bindir
        self.port = port if port is not None else free_port("127.0.0.1")
        self.durable = durable
        self.max_connections = max_connections
        # Not under pytest's tmp_path: that is private to root, and the postgres user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="facegate-pg-"))
        self.data_dir = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            entry = pwd.getpwnam(PG_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._running = False

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the ``facegate`` database."""
        return f"postgresql+psycopg://{DB_ROLE}@127.0.0.1:{self.port}/{DB_NAME}"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / tool), *args]
        if self._as_postgres:
            argv = ["runuser", "-u", PG_USER, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,  # noqa: S603
                              check=False, cwd=self.root)

    def _check(self, what: str, done: subprocess.CompletedProcess[str]) -> None:
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise PostgresStartError(f"{what} failed ({done.returncode}): {' | '.join(tail)}; "
                                     f"log {self.log_file}")

    def start(self) -> LocalPostgres:
        """initdb (first time), start the server and create the database; waits until it accepts."""
        if not self.data_dir.exists():
            self._check("initdb", self._run("initdb", "-D", str(self.data_dir), "-U", DB_ROLE,
                                            "--auth=trust", "-E", "UTF8", "--no-instructions"))
        options = [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.root}",
                   f"-c max_connections={self.max_connections}"]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._check("pg_ctl start", self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file),
                                              "-w", "-t", str(START_TIMEOUT_S), "-o", " ".join(options),
                                              "start"))
        self._running = True
        exists = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_ROLE, "-d", "postgres",
                           "-tAc", "SELECT 1 FROM pg_database WHERE datname = 'facegate'")  # DB_NAME
        self._check("psql", exists)
        if exists.stdout.strip() != "1":
            self._check("createdb", self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port),
                                              "-U", DB_ROLE, DB_NAME))
        logger.info("throwaway PostgreSQL listening on 127.0.0.1:%d", self.port)
        return self

    def create_database(self, name: str) -> str:
        """Create another empty database (one per test keeps a shared cluster's tests apart); its URL."""
        if not name.replace("_", "").isalnum() or not name[0].isalpha():
            raise ValueError(f"bad database name {name!r}: letters, digits and _ only")
        self._check("createdb", self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port),
                                          "-U", DB_ROLE, name))
        return f"postgresql+psycopg://{DB_ROLE}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server (fast shutdown; safe to call twice). The data stays until :meth:`close`."""
        if self._running:
            self._running = False
            done = self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
            if done.returncode != 0:
                logger.warning("pg_ctl stop failed: %s", done.stderr.strip())

    def close(self) -> None:
        """Stop the server and delete the cluster (safe to call twice)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
