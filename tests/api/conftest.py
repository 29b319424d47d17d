"""The API in this process (no Ray): real scheduler, engines (torch), S3 (SeaweedFS) and SQLite."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tenants import add_tenant


@pytest.fixture(scope="module")
def api_config(config, s3, tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("api")
    os.environ["AWS_ACCESS_KEY_ID"] = s3.access_key
    os.environ["AWS_SECRET_ACCESS_KEY"] = s3.secret_key
    return config.model_copy(
        update={
            "paths": config.paths.model_copy(update={"data_dir": root / "var"}),
            "storage": config.storage.model_copy(update={"endpoint_url": s3.endpoint_url, "bucket": "results"}),
            "database": config.database.model_copy(update={"url": f"sqlite:///{root / 'jobs.db'}"}),
            "webhooks": config.webhooks.model_copy(update={"allow_private": True, "signing_secret": None}),
            "limits": config.limits.model_copy(update={"allow_private_urls": True, "sync_timeout_s": 60}),
            "tenancy": config.tenancy.model_copy(update={"dirs": [root / "tenants"], "reload_s": 0.01}),
        }
    )


@pytest.fixture(scope="module")
def keys(api_config) -> dict[str, str]:
    return {
        "acme": add_tenant(api_config, "acme", priority_class="standard"),
        "globex": add_tenant(api_config, "globex", priority_class="standard"),
    }


@pytest_asyncio.fixture(scope="module")
async def platform(api_config, keys, torch_engine, base_torch_engine):
    from zimage_platform.engines import PipelineEngine
    from zimage_platform.serve.inprocess import InProcessPlatform

    edit = PipelineEngine(api_config, "edit", "torch")
    edit.load()
    platform = InProcessPlatform(api_config, {"turbo": torch_engine, "base": base_torch_engine, "edit": edit})
    await platform.start()
    yield platform
    await platform.stop()


@pytest_asyncio.fixture(scope="module")
async def client(platform, keys):
    transport = httpx.ASGITransport(app=platform.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://platform", timeout=60) as c:
        c.headers["Authorization"] = f"Bearer {keys['acme']}"
        yield c
