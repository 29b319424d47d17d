"""The API in this process (no Ray): real scheduler, engines (torch), S3 (SeaweedFS) and SQLite."""

from __future__ import annotations

import httpx
import pytest
import pytest_asyncio

from isolated import isolated_config
from tenants import add_tenant


@pytest.fixture(scope="module")
def api_config(config, s3, tmp_path_factory):
    return isolated_config(
        config,
        s3,
        tmp_path_factory.mktemp("api"),
        webhooks={"allow_private": True, "signing_secret": None, "backoff_s": 0.05, "poll_s": 0.05},
        limits={"allow_private_urls": True, "sync_timeout_s": 60},
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
