"""The tenant registry: definitions from YAML folders, API-key authentication.

Files are re-read when they change (checked at most every ``reload_s``), so a key rotated or
a tenant suspended with the CLI takes effect on running replicas without a restart.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import yaml

from zimage_platform.errors import PlatformError
from zimage_platform.tenancy.keys import parse_key, verify_secret
from zimage_platform.tenancy.models import ApiKeyRecord, TenantSpec


class AuthError(PlatformError):
    code = "invalid_api_key"
    status = 401


class TenantSuspended(PlatformError):
    code = "tenant_suspended"
    status = 403


def load_pepper(value: str | None, file: Path) -> bytes:
    """The key-hashing secret: from config/env, else a file created once (0600)."""
    if value:
        return value.encode()
    if not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    return file.read_text().strip().encode()


class TenantRegistry:
    def __init__(self, dirs: Iterable[Path], pepper: bytes, *, reload_s: float = 2.0) -> None:
        self.dirs = [Path(d) for d in dirs]
        self.pepper = pepper
        self.reload_s = reload_s
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._checked = 0.0
        self._tenants: dict[str, TenantSpec] = {}
        self._files: dict[str, Path] = {}
        self._keys: dict[str, tuple[str, ApiKeyRecord]] = {}
        self.reload(force=True)

    # -- loading ------------------------------------------------------------------------

    def _files_stamp(self) -> tuple:
        files = sorted(p for d in self.dirs if d.is_dir() for p in d.glob("*.yaml"))
        return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)

    def reload_due(self) -> bool:
        """Whether the next lookup re-reads the tenant files (an event loop does that in a worker
        thread first, so the lookup itself stays in memory)."""
        return time.monotonic() - self._checked >= self.reload_s

    def reload(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.reload_s:
            return
        with self._lock:
            self._checked = now
            stamp = self._files_stamp()
            if stamp == self._stamp and not force:
                return
            tenants: dict[str, TenantSpec] = {}
            files: dict[str, Path] = {}
            for name, _, _ in stamp:
                path = Path(name)
                data = yaml.safe_load(path.read_text()) or {}
                try:
                    spec = TenantSpec.model_validate(data)
                except ValueError as exc:
                    raise ValueError(f"{path}: {exc}") from exc
                if spec.id in tenants:
                    raise ValueError(f"tenant {spec.id!r} is defined twice ({files[spec.id]} and {path})")
                tenants[spec.id], files[spec.id] = spec, path
            self._tenants, self._files, self._stamp = tenants, files, stamp
            self._keys = {k.id: (t.id, k) for t in tenants.values() for k in t.api_keys}

    # -- reads --------------------------------------------------------------------------

    def get(self, tenant_id: str) -> TenantSpec | None:
        self.reload()
        return self._tenants.get(tenant_id)

    def all(self) -> list[TenantSpec]:
        self.reload()
        return sorted(self._tenants.values(), key=lambda t: t.id)

    def path_of(self, tenant_id: str) -> Path | None:
        return self._files.get(tenant_id)

    def authenticate(self, raw_key: str | None, *, now: datetime | None = None) -> TenantSpec:
        """The tenant a key belongs to, or a 401/403 with the reason."""
        if not raw_key:
            raise AuthError("an API key is required (Authorization: Bearer <key> or X-API-Key)", code="missing_api_key")
        self.reload()
        parsed = parse_key(raw_key)
        found = self._keys.get(parsed[0]) if parsed else None
        if parsed is None or found is None or not verify_secret(parsed[1], found[1].hash, self.pepper):
            raise AuthError("the API key is not valid")
        return self._usable(*found, now=now)

    def key_holder(self, key_id: str, *, now: datetime | None = None) -> TenantSpec:
        """The tenant of a key already verified once (a browser session holds its id, never the
        key): the same 401/403 as :meth:`authenticate` once it is revoked, expired or suspended."""
        self.reload()
        found = self._keys.get(key_id)
        if found is None:
            raise AuthError("the API key of this session no longer exists", code="api_key_revoked")
        return self._usable(*found, now=now)

    def _usable(self, tenant_id: str, record: ApiKeyRecord, *, now: datetime | None = None) -> TenantSpec:
        now = now or datetime.now(UTC)
        if record.revoked_at is not None and record.revoked_at <= now:
            raise AuthError("the API key was revoked", code="api_key_revoked")
        if record.expires_at is not None and record.expires_at <= now:
            raise AuthError("the API key has expired", code="api_key_expired")
        tenant = self._tenants[tenant_id]
        if tenant.status == "suspended":
            reason = f": {tenant.suspended_reason}" if tenant.suspended_reason else ""
            raise TenantSuspended(f"tenant {tenant.id} is suspended{reason}")
        return tenant
