"""The platform over real HTTP for ComfyUI clients: the in-process app (real scheduler, torch
engines, SeaweedFS S3, SQLite) served by uvicorn on a free loopback port, in its own thread,
so blocking clients (urllib, websocket-client) talk to it exactly as to a ComfyUI server."""

from __future__ import annotations

import pytest

from comfy_server import ServerThread
from isolated import isolated_config
from tenants import add_tenant


@pytest.fixture(scope="module")
def comfy_config(config, s3, tmp_path_factory):
    return isolated_config(config, s3, tmp_path_factory.mktemp("comfy"), limits={"max_input_image_bytes": 256 * 1024})


@pytest.fixture(scope="module")
def comfy_keys(comfy_config) -> dict[str, str]:
    return {
        "acme": add_tenant(comfy_config, "acme", priority_class="standard"),
        "globex": add_tenant(comfy_config, "globex", priority_class="standard"),
    }


@pytest.fixture(scope="module")
def comfy_server(comfy_config, comfy_keys, torch_engine, base_torch_engine):
    server = ServerThread(comfy_config, {"turbo": torch_engine, "base": base_torch_engine}).start()
    yield server
    server.stop()
