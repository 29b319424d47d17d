"""The README's main job, as a user runs it: ``zimage-platform serve`` in its own process, from a
folder outside the checkout, starts the embedded S3, the database, Ray and the Serve app, prints
its URL, demo key and metrics URL (and no library warnings); every packaged variant is served;
an image can be generated and billed; the CLI finds the bill and audits it against the running
embedded S3; Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from zimage_platform.serve.launcher import RAY_ENV
from zimage_platform.storage.seaweedfs import free_ports


def free_port() -> int:
    return free_ports(1)[0]


def cli(config_file: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "zimage_platform.cli", "--config", str(config_file), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_serve_prints_how_to_use_it_generates_bills_and_stops_cleanly(config, tmp_path):
    data = tmp_path / "var"
    config_file = tmp_path / "zimage-platform.yaml"
    settings = {
        "paths": {
            "data_dir": str(data),
            "engines_dir": str(tmp_path / "engines"),
            "engine_build_dir": str(config.paths.engine_build_dir),
        },
        "telemetry": {"metrics_port": free_port()},
    }
    config_file.write_text(yaml.safe_dump(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ZIMAGE_"))} | RAY_ENV
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "zimage_platform.cli", "--config", str(config_file), "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,  # as after `pip install`: no engines/ or tenants/ folder here
        start_new_session=True,
    )
    printed: list[str] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            assert line or server.poll() is None, "serve exited:\n" + "".join(printed)
            printed.append(line)
            if line.startswith("metrics"):
                break
        text = "".join(printed)
        assert f"zimage-platform is ready at http://127.0.0.1:{port}" in text, text
        key = re.search(r"demo API key: (zk_\S+)", text).group(1)
        metrics_url = re.search(r"(http://127\.0\.0\.1:\d+/metrics)", text).group(1)
        assert "warn" not in text.lower(), text
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert {m["variant"] for m in models.json()["data"]} == {"turbo", "base", "edit"}, models.text

        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/images/generations",
            json={"prompt": "a red fox in fresh snow", "size": "256x256"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=300,
        )
        assert answer.status_code == 200, answer.text
        assert httpx.get(answer.json()["data"][0]["url"]).content.startswith(b"\x89PNG")
        trace_id = answer.headers["x-trace-id"]

        bill = cli(config_file, "billing", "entries", "--trace", trace_id, env=env)
        assert bill.returncode == 0, bill.stderr
        assert '"tenant_id": "demo"' in bill.stdout and trace_id in bill.stdout
        audit = cli(config_file, "billing", "audit", "--from", "today", "--to", "today", env=env)
        assert audit.returncode == 0, audit.stdout + audit.stderr  # reaches the running embedded S3
        assert "ray_zimage_http_requests_total" in httpx.get(metrics_url, timeout=10).text
    finally:
        server.send_signal(signal.SIGINT)
        try:
            rest, _ = server.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            rest, _ = server.communicate()
    assert server.returncode == 0, "".join(printed) + rest
    assert "stopping" in rest
    assert not (data / "run" / "embedded-s3.json").exists()
    with httpx.Client() as client:
        try:
            client.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            raise AssertionError("the Serve proxy still answers after Ctrl-C")
        except httpx.TransportError:
            pass
