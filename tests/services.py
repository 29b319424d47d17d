"""Real PostgreSQL and Redis for the tests, found or started once per run.

The machines this runs on (CI included) already serve PostgreSQL on 127.0.0.1:5432 and Redis
on 127.0.0.1:6379; each run then creates (and drops) its own database and uses its own key
prefix so concurrent runs never collide. Where either is absent (a developer's laptop), the
test setup starts a private one on a free port from the Debian binaries and stops it after.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from bench.services import PrivatePostgres, PrivateRedis, answers, free_port

# -- PostgreSQL -----------------------------------------------------------------------------


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
    if answers("127.0.0.1", 5432):
        yield 5432
    else:
        with PrivatePostgres() as server:
            yield server.port


# -- Redis ----------------------------------------------------------------------------------


@contextmanager
def redis_url() -> Iterator[str]:
    """A Redis URL: the machine's own server, or a private one on a free port."""
    if answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    with PrivateRedis() as server:
        yield server.url


def closed_port() -> int:
    """A local port nothing listens on (connections are refused at once)."""
    return free_port()


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
