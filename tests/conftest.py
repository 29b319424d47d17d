"""Shared fixtures: one tiny checkpoint and one set of built engines per test run."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import httpcore
import pytest

from zimage_platform.config import PlatformConfig, load_config

REPO = Path(__file__).resolve().parents[1]


class OutsideRepositoryRead(RuntimeError):
    """A test read a file from beside the checkout (not an OSError, so nobody swallows it)."""


def _forbidden_roots() -> tuple[str, ...]:
    """The checkout's sibling ``shared`` folder (and where it links to): test data lives in
    tests/fixtures, so a fresh clone with nothing beside it passes the same tests."""
    sibling = REPO.parent / "shared"
    return tuple(dict.fromkeys(os.path.join(p, "") for p in (str(sibling), os.path.realpath(sibling))))


FORBIDDEN = _forbidden_roots()


def _guard_outside_reads(event: str, args: tuple) -> None:
    if event not in ("open", "os.listdir", "os.scandir") or not args:
        return
    path = args[0]
    if isinstance(path, int) or path is None:
        return
    try:
        name = os.path.abspath(os.fsdecode(path))
    except (TypeError, ValueError):
        return
    if os.path.join(name, "").startswith(FORBIDDEN):
        raise OutsideRepositoryRead(f"tests must not read {name}: copy test data into tests/fixtures/")


# An audit hook cannot be removed: every test process refuses ../shared for its whole life.
sys.addaudithook(_guard_outside_reads)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zimage")


@pytest.fixture(scope="session")
def config(session_dir: Path) -> PlatformConfig:
    """The platform config with data and engine builds under the session's temp folder; the
    variant specs are the packaged ones (no override folder, whatever the checkout's engines/ holds)."""
    return load_config(
        paths={
            "data_dir": str(session_dir / "var"),
            "engines_dir": str(session_dir / "no-overrides"),
            "engine_build_dir": str(session_dir / "engines-build"),
        },
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(config: PlatformConfig) -> Path:
    from zimage_platform.pipeline.tiny import init_tiny_checkpoint

    return init_tiny_checkpoint(config.paths.tiny_checkpoint)


@pytest.fixture(scope="session")
def torch_engine(config: PlatformConfig, tiny_checkpoint: Path):
    from zimage_platform.engines import PipelineEngine

    engine = PipelineEngine(config, "turbo", "torch")
    engine.load()
    return engine


@pytest.fixture(scope="session")
def base_torch_engine(config: PlatformConfig, tiny_checkpoint: Path):
    from zimage_platform.engines import PipelineEngine

    engine = PipelineEngine(config, "base", "torch")
    engine.load()
    return engine


@pytest.fixture(scope="session")
def ort_engine(config: PlatformConfig, tiny_checkpoint: Path):
    """The turbo engine on ONNX Runtime, built once per run (about 25 s on 2 cores)."""
    from zimage_platform.engines import PipelineEngine, build_engine

    build_engine(config, "turbo", "onnxruntime")
    engine = PipelineEngine(config, "turbo", "onnxruntime")
    engine.load()
    return engine


@pytest.fixture(scope="session")
def s3(session_dir: Path):
    """A real SeaweedFS S3 server (SigV4 checked) for the whole run."""
    from zimage_platform.storage import SeaweedFS

    server = SeaweedFS(session_dir / "seaweedfs", access_key="test-access", secret_key="test-secret-key")
    server.start(buckets=("models", "results"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh database on a real PostgreSQL server (the machine's, or one started here)."""
    from services import postgres_database

    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url():
    from services import redis_url as find_redis

    with find_redis() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    """Every database test runs on both backends; each test gets an empty schema."""
    from zimage_platform.db import create_db_engine, upgrade
    from zimage_platform.db.migrate import downgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'zimage.db'}"
        upgrade(create_db_engine(url))
        return url
    url = request.getfixturevalue("postgres_url")
    engine = create_db_engine(url)
    downgrade(engine, "base")
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def dns(monkeypatch):
    """Names under ``.test`` answer from a script: each lookup takes the next answer (the last repeats)."""
    answers: dict[str, list[str]] = {}
    lookups: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        host = host.decode() if isinstance(host, bytes) else host  # anyio passes IDNA bytes
        if isinstance(host, str) and host.endswith(".test"):
            lookups.append(host)
            script = answers[host]
            address = script.pop(0) if len(script) > 1 else script[0]
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (address, int(port or 0)))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, lookups


@pytest.fixture
def connects(monkeypatch):
    """Every TCP connect the HTTP clients make; a public address is refused (tests stay offline)."""
    from zimage_platform.netsafe import is_public

    seen: list[tuple[str, int]] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def connect_tcp(self, host, port, *args, **kwargs):
        seen.append((host, port))
        if is_public(host):
            raise httpcore.ConnectError("no route to a public address in tests")
        return await real(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", connect_tcp)
    return seen
