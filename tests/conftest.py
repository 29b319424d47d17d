"""Shared fixtures: one tiny checkpoint and one set of built engines per test run."""

from __future__ import annotations

from pathlib import Path

import pytest

from zimage_platform.config import PlatformConfig, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zimage")


@pytest.fixture(scope="session")
def config(session_dir: Path) -> PlatformConfig:
    """The platform config with data and engine builds under the session's temp folder."""
    return load_config(
        paths={
            "data_dir": str(session_dir / "var"),
            "engines_dir": str(REPO / "engines"),
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
