"""The embedded default's S3 (SeaweedFS on the data folder): one owner at a time, shared with a
running ``serve``, and never outliving the process that started it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from zimage_platform.config import load_config
from zimage_platform.errors import PlatformError
from zimage_platform.storage.embedded import embedded_s3, state_file

#: A parent that starts SeaweedFS as ``serve`` does, prints weed's pid, and waits to be killed.
PARENT = """
import sys, threading
from pathlib import Path
from zimage_platform.storage import SeaweedFS

server = SeaweedFS(Path(sys.argv[1]), access_key="k", secret_key="secret-key-1")
server.start()
print(server.process.pid, flush=True)
threading.Event().wait()
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_weed_dies_with_the_process_that_started_it(tmp_path: Path):
    """A SIGKILLed ``serve`` cannot stop its children: the kernel's parent-death signal does."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "s3")], stdout=subprocess.PIPE, text=True)
    weed_pid = int(parent.stdout.readline())
    try:
        assert "mini" in psutil.Process(weed_pid).cmdline()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not gone(weed_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(weed_pid), "weed mini outlived the process that started it"
    finally:
        parent.kill()
        if not gone(weed_pid):
            psutil.Process(weed_pid).kill()


@pytest.fixture
def embedded_config(tmp_path: Path):
    return load_config(paths={"data_dir": str(tmp_path / "var"), "engines_dir": str(tmp_path / "engines")})


def test_commands_attach_to_serve_and_a_second_serve_is_refused(embedded_config):
    with embedded_s3(embedded_config, owner="serve") as live:
        assert live is not None and live.owner == "serve"
        with embedded_s3(embedded_config, owner="billing audit") as attached:
            assert attached == live  # same server, same credentials: nothing else started
        assert not gone(json.loads(state_file(embedded_config).read_text())["weed_pid"])  # still serving
        with pytest.raises(PlatformError) as err, embedded_s3(embedded_config, owner="serve"):
            pass
        assert err.value.code == "embedded_s3_in_use" and "in use by serve (pid" in err.value.message
    assert not state_file(embedded_config).exists()


def test_a_command_runs_its_own_and_the_next_one_waits(embedded_config):
    with embedded_s3(embedded_config, owner="billing audit") as own:
        assert own is not None and own.owner == "billing audit"
        with pytest.raises(PlatformError) as err, embedded_s3(embedded_config, owner="billing statement", wait_s=0.3):
            pass
        assert err.value.code == "embedded_s3_in_use" and "retry when it has finished" in err.value.message
    with embedded_s3(embedded_config, owner="billing statement") as later:  # free again
        assert later is not None and later.owner == "billing statement"


def test_nothing_starts_for_a_configured_endpoint(embedded_config):
    configured = embedded_config.model_copy(
        update={"storage": embedded_config.storage.model_copy(update={"endpoint_url": "http://s3.example.com"})}
    )
    with embedded_s3(configured, owner="billing audit") as s3:
        assert s3 is None
    assert not (embedded_config.paths.data_dir / "run").exists()
