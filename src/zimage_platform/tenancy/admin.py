"""Tenant administration (the ``zimage-platform tenants`` commands), audited.

Tenant files are rewritten atomically (temp file + rename), so a replica reloading at the same
moment sees the old or the new definition, never half of one. Every change is recorded in the
audit log with its actor and time. There is no HTTP endpoint for any of this.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import yaml

from zimage_platform.errors import PlatformError
from zimage_platform.tenancy.audit import AuditLog
from zimage_platform.tenancy.keys import issue_key
from zimage_platform.tenancy.models import ApiKeyRecord, TenantSpec
from zimage_platform.tenancy.registry import TenantRegistry


class TenantNotFound(PlatformError):
    code = "tenant_not_found"
    status = 404


class TenantExists(PlatformError):
    code = "tenant_exists"
    status = 409


def write_spec(path: Path, spec: TenantSpec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = spec.model_dump(mode="json", exclude_none=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.id}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)


class TenantAdmin:
    def __init__(self, registry: TenantRegistry, folder: Path, audit: AuditLog, *, actor: str) -> None:
        self.registry = registry
        self.folder = folder
        self.audit = audit
        self.actor = actor

    def _load(self, tenant_id: str) -> tuple[TenantSpec, Path]:
        self.registry.reload(force=True)
        spec, path = self.registry.get(tenant_id), self.registry.path_of(tenant_id)
        if spec is None or path is None:
            raise TenantNotFound(
                f"no tenant {tenant_id!r}", param="tenant", choices=[t.id for t in self.registry.all()]
            )
        return spec, path

    def _new_key(self, label: str, expires_at: datetime | None) -> tuple[ApiKeyRecord, str]:
        issued = issue_key(self.registry.pepper)
        record = ApiKeyRecord(
            id=issued.key_id, hash=issued.hash, created_at=datetime.now(UTC), expires_at=expires_at, label=label
        )
        return record, issued.raw

    def add(self, spec: TenantSpec, *, key_label: str = "initial", key_expires_at: datetime | None = None) -> str:
        """Create a tenant with one key; returns the raw key (shown once, never stored)."""
        self.registry.reload(force=True)
        if self.registry.get(spec.id) is not None:
            raise TenantExists(f"tenant {spec.id!r} already exists", param="tenant")
        record, raw = self._new_key(key_label, key_expires_at)
        spec = spec.model_copy(update={"api_keys": [record]})
        write_spec(self.folder / f"{spec.id}.yaml", spec)
        self.audit.record(
            "tenant.created",
            actor=self.actor,
            tenant_id=spec.id,
            plan=spec.plan,
            priority_class=spec.priority_class,
            key_id=record.id,
        )
        return raw

    def rotate_key(self, tenant_id: str, *, label: str = "rotated", expires_at: datetime | None = None) -> str:
        """Add a new key; existing keys keep working until revoked (rotation without downtime)."""
        spec, path = self._load(tenant_id)
        record, raw = self._new_key(label, expires_at)
        write_spec(path, spec.model_copy(update={"api_keys": [*spec.api_keys, record]}))
        self.audit.record(
            "key.created",
            actor=self.actor,
            tenant_id=tenant_id,
            key_id=record.id,
            expires_at=expires_at.isoformat() if expires_at else None,
        )
        return raw

    def revoke_key(self, tenant_id: str, key_id: str) -> None:
        spec, path = self._load(tenant_id)
        if key_id not in {k.id for k in spec.api_keys}:
            raise PlatformError(
                f"tenant {tenant_id} has no key {key_id}",
                code="key_not_found",
                param="key_id",
                choices=[k.id for k in spec.api_keys],
            )
        now = datetime.now(UTC)
        keys = [
            k.model_copy(update={"revoked_at": now}) if k.id == key_id and k.revoked_at is None else k
            for k in spec.api_keys
        ]
        write_spec(path, spec.model_copy(update={"api_keys": keys}))
        self.audit.record("key.revoked", actor=self.actor, tenant_id=tenant_id, key_id=key_id)

    def suspend(self, tenant_id: str, reason: str) -> None:
        spec, path = self._load(tenant_id)
        write_spec(path, spec.model_copy(update={"status": "suspended", "suspended_reason": reason}))
        self.audit.record("tenant.suspended", actor=self.actor, tenant_id=tenant_id, reason=reason)

    def resume(self, tenant_id: str) -> None:
        spec, path = self._load(tenant_id)
        write_spec(path, spec.model_copy(update={"status": "active", "suspended_reason": None}))
        self.audit.record("tenant.resumed", actor=self.actor, tenant_id=tenant_id)
