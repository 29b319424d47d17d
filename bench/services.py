"""Private PostgreSQL and Redis servers on free loopback ports, from the Debian binaries.

Two users need a server of their own rather than the machine's: the test setup, where the
machine serves none (a developer's laptop), and the fault drills (``python -m bench drills``),
which stop and restart one under a running platform and must not touch a server others share.
Each object stops only the process it started and removes its own folder.

The lifecycle they share (:class:`Lifecycle`: a context manager that stops what it started, also
when starting fails halfway) and :func:`free_port` serve every other server a benchmark starts
too (``BenchCluster``, the fuzzed platform, the hand-rolled peer server); this module stays on the
standard library, so the test setup can import it cheaply.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def answers(host: str, port: int) -> bool:
    """Something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers("127.0.0.1", port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing answered on 127.0.0.1:{port} after {timeout}s")


class Lifecycle:
    """Something the caller starts and must stop, used as a context manager: started on entry,
    closed on exit, and closed too when starting fails halfway (``close`` copes with a partial
    start), so nothing a benchmark or a test started outlives it."""

    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """The end of its life; a stop, unless a subclass that can start again frees more here."""
        self.stop()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PrivateServer(Lifecycle):
    """A server process of the caller's own under ``root``: :meth:`stop` and :meth:`start` again
    as often as a drill asks; :meth:`close` also removes ``root``."""

    root: Path

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class PrivatePostgres(_PrivateServer):
    """``initdb`` once, then ``pg_ctl start``/``stop`` on the same port and data as often as asked.

    ``initdb`` refuses root, so as root the server runs as the ``postgres`` user. Trust auth,
    loopback only: the superuser ``postgres`` connects without a password.
    """

    def __init__(self) -> None:
        self.binary = PG_BIN if PG_BIN.is_dir() else Path(shutil.which("initdb") or "initdb").parent
        self.root = Path(tempfile.mkdtemp(prefix="zimage-pg-"))
        self.port = free_port()
        self._as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as_user = {"user": pw.pw_uid, "group": pw.pw_gid}
        self._initialised = False

    def _ctl(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.binary / "pg_ctl", "-D", self.root / "db", *args], check=check, capture_output=True, **self._as_user
        )

    def start(self) -> Self:
        if not self._initialised:
            subprocess.run(
                [self.binary / "initdb", "-D", self.root / "db", "-U", "postgres", "--auth=trust"],
                check=True,
                capture_output=True,
                **self._as_user,
            )
            self._initialised = True
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._ctl("-l", self.root / "log", "-w", "start", "-o", options)
        wait_for_port(self.port)
        return self

    def stop(self, mode: str = "fast") -> None:
        """``fast``: open connections are cut, as a restart by an operator or a failover does."""
        self._ctl("-m", mode, "-w", "stop", check=False)

    def create_database(self, name: str) -> str:
        """A new database; its SQLAlchemy URL (psycopg 3)."""
        import psycopg

        admin = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


class PrivateRedis(_PrivateServer):
    """``redis-server`` without persistence on a free port; :meth:`start` again after :meth:`stop`
    comes back on the same port (empty, as a restarted cache does)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="zimage-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", *args, "--dir", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
