"""Real PostgreSQL and Redis for the tests, found or started once per run.

The machines this runs on (CI included) already serve PostgreSQL on 127.0.0.1:5432 and Redis
on 127.0.0.1:6379; each run then creates (and drops) its own database and uses its own key
prefix so concurrent runs never collide. Where either is absent (a developer's laptop), the
test setup starts a private one on a free port from the Debian binaries and stops it after.
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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers("127.0.0.1", port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing answered on 127.0.0.1:{port} after {timeout}s")


# -- PostgreSQL -----------------------------------------------------------------------------


@contextmanager
def _private_postgres() -> Iterator[int]:
    """initdb + pg_ctl on a free port; initdb refuses root, so it runs as the postgres user."""
    binary = PG_BIN if PG_BIN.is_dir() else Path(shutil.which("initdb") or "initdb").parent
    data = Path(tempfile.mkdtemp(prefix="zimage-pg-"))
    port = _free_port()
    as_user: dict = {}
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid}
    subprocess.run(
        [binary / "initdb", "-D", data / "db", "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
        **as_user,
    )
    subprocess.run(
        [
            binary / "pg_ctl",
            "-D",
            data / "db",
            "-l",
            data / "log",
            "-w",
            "start",
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
        ],
        check=True,
        capture_output=True,
        **as_user,
    )
    try:
        _wait_for(port)
        yield port
    finally:
        subprocess.run([binary / "pg_ctl", "-D", data / "db", "-m", "fast", "stop"], capture_output=True, **as_user)
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty database URL (SQLAlchemy + psycopg 3), dropped afterwards."""
    import psycopg

    with _postgres_port() as port:
        name = f"zimage_test_{uuid.uuid4().hex[:12]}"
        admin = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def _postgres_port() -> Iterator[int]:
    if _answers("127.0.0.1", 5432):
        yield 5432
    else:
        with _private_postgres() as port:
            yield port


# -- Redis ----------------------------------------------------------------------------------


class RedisServer:
    """A private ``redis-server`` on a free port (no persistence) that a test may stop and start
    again on the same port: a real outage of the one server it uses."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = Path(tempfile.mkdtemp(prefix="zimage-redis-"))
        self._proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        command = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self._workdir)]
        self._proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(self.port)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
            self._proc.wait(timeout=10)
            self._proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)


@contextmanager
def redis_url() -> Iterator[str]:
    """A Redis URL: the machine's own server, or a private one on a free port."""
    if _answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    with RedisServer() as server:
        yield server.url


def closed_port() -> int:
    """A local port nothing listens on (connections are refused at once)."""
    return _free_port()


def wait_http_ready(url: str, timeout: float = 300) -> None:
    """Poll ``{url}/readyz`` until it answers 200 (timeouts and refusals count as "not yet")."""
    import httpx

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"{url}/readyz", timeout=5)
            if last.status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready: {getattr(last, 'text', last)}")


@contextmanager
def postgres_outage(url: str) -> Iterator[None]:
    """The database at ``url`` refuses connections (its open ones are cut) until the block ends:
    a real outage of that one database, not of the server other tests share."""
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    admin = f"host={parsed.host} port={parsed.port or 5432} user={parsed.username} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{parsed.database}" ALLOW_CONNECTIONS false')
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (parsed.database,),
        )
    try:
        yield
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{parsed.database}" ALLOW_CONNECTIONS true')
