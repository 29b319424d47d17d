"""The platform over real HTTP for browsers: the in-process app served by uvicorn on a loopback
port (real scheduler, torch engines, SeaweedFS S3, SQLite), three tenants."""

from __future__ import annotations

import pytest

from comfy_server import ServerThread
from isolated import isolated_config
from tenants import add_tenant


@pytest.fixture(scope="module")
def web_config(config, s3, tmp_path_factory):
    return isolated_config(
        config,
        s3,
        tmp_path_factory.mktemp("frontend"),
        frontend={
            "userdata_max_file_bytes": 64 * 1024,
            "userdata_max_total_bytes": 160 * 1024,
            "userdata_max_files": 20,
        },
    )


@pytest.fixture(scope="module")
def web_keys(web_config) -> dict[str, str]:
    return {name: add_tenant(web_config, name, priority_class="standard") for name in ("acme", "globex", "initech")}


@pytest.fixture(scope="module")
def web_server(web_config, web_keys, torch_engine, base_torch_engine):
    server = ServerThread(web_config, {"turbo": torch_engine, "base": base_torch_engine}).start()
    yield server
    server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each test's outcome on its item (``rep_call``), so browser fixtures can dump on failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
