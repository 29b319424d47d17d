"""Webhook signing secrets: one per tenant, so no tenant can sign events another tenant accepts.

A tenant's secret is derived from the platform's master secret (``webhooks.signing_secret``, or a
file under the data folder): ``HMAC-SHA256(master, "<tenant id>/<generation>")``. Nothing per
tenant is stored but the generation, which a rotation bumps; every replica derives the same
secret, and the master never leaves the platform. A tenant reads its secret with
``GET /v1/webhooks/secret`` and rotates it with ``POST /v1/webhooks/secret/rotate``: for
``webhooks.rotation_overlap_s`` afterwards, events carry a signature with the previous secret
too, so a receiver can switch without refusing anything.

A tenant whose definition names its own secret (``webhook_secret_ref``: ``env:VAR`` or
``file:/path``) is signed with that one instead; its operator rotates it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, Integer, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from zimage_platform.db import Base, UTCDateTime, session_factory, utcnow
from zimage_platform.errors import PlatformError
from zimage_platform.scheduling.webhooks import generate_secret
from zimage_platform.tenancy.models import TenantSpec

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig


class WebhookSecretRow(Base):
    """A tenant's secret generation (no row: generation 1, never rotated)."""

    __tablename__ = "webhook_secrets"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
    rotated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: Until when the previous generation still signs (a second signature).
    previous_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ExternalSecret(PlatformError):
    """The tenant's secret is the operator's (``webhook_secret_ref``): not shown, not rotated here."""

    code = "webhook_secret_external"
    status = 409


@dataclass(frozen=True)
class SigningSecret:
    secret: str
    generation: int | None
    #: When it stops signing (the previous secret after a rotation); None: current.
    expires_at: datetime | None = None


def master_secret(configured: str | None, file: Path) -> str:
    """The configured master secret, else the one in ``file`` (created on first use, mode 0600)."""
    if configured:
        return configured
    if not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return file.read_text().strip()
        with os.fdopen(fd, "w") as fh:
            fh.write(generate_secret())
    return file.read_text().strip()


def derive_secret(master: str, tenant_id: str, generation: int) -> str:
    """The tenant's ``whsec_`` secret of that generation (what Standard Webhooks SDKs read)."""
    digest = hmac.new(master.encode(), f"zimage-webhooks/{tenant_id}/{generation}".encode(), hashlib.sha256)
    return "whsec_" + base64.b64encode(digest.digest()).decode()


def read_secret_ref(ref: str) -> str:
    """The value behind ``env:VAR`` / ``file:/path``; ValueError if it is empty or missing."""
    kind, _, where = ref.partition(":")
    try:
        value = os.environ.get(where) if kind == "env" else Path(where).read_text().strip()
    except OSError as exc:
        raise ValueError(f"webhook secret {ref} cannot be read") from exc
    if not value:
        raise ValueError(f"webhook secret {ref} is empty or missing")
    return value


class WebhookSecrets:
    """Each tenant's signing secrets: derived from the master, or the tenant's own reference."""

    def __init__(
        self,
        master: str,
        engine: Engine,
        tenant: Callable[[str], TenantSpec | None],
        *,
        rotation_overlap_s: float = 86400.0,
    ) -> None:
        self._master = master
        self._sessions = session_factory(engine)
        self._tenant = tenant
        self.rotation_overlap_s = rotation_overlap_s

    @classmethod
    def from_config(
        cls, config: PlatformConfig, engine: Engine, tenant: Callable[[str], TenantSpec | None]
    ) -> WebhookSecrets:
        """Every process (scheduler, ingress replicas) derives the same secrets from the same config."""
        master = master_secret(config.webhooks.signing_secret, config.paths.data_dir / "secrets" / "webhook-secret")
        return cls(master, engine, tenant, rotation_overlap_s=config.webhooks.rotation_overlap_s)

    def secrets(self, tenant_id: str, now: datetime | None = None) -> list[SigningSecret]:
        """What signs the tenant's events now: its current secret, then the previous one during
        a rotation's overlap. ValueError when the tenant's own reference cannot be read."""
        spec = self._tenant(tenant_id)
        if spec is not None and spec.webhook_secret_ref:
            return [SigningSecret(read_secret_ref(spec.webhook_secret_ref), None)]
        now = now or utcnow()
        with self._sessions() as s:
            row = s.get(WebhookSecretRow, tenant_id)
        generation = row.generation if row else 1
        found = [SigningSecret(derive_secret(self._master, tenant_id, generation), generation)]
        if row is not None and row.previous_until is not None and row.previous_until > now:
            previous = derive_secret(self._master, tenant_id, generation - 1)
            found.append(SigningSecret(previous, generation - 1, row.previous_until))
        return found

    def signing(self, tenant_id: str) -> list[str]:
        return [s.secret for s in self.secrets(tenant_id)]

    def for_tenant(self, tenant: TenantSpec) -> list[SigningSecret]:
        """The secrets a tenant may read through the API (not an operator-managed one)."""
        if tenant.webhook_secret_ref:
            raise _external(tenant)
        return self.secrets(tenant.id)

    def rotate(self, tenant: TenantSpec, now: datetime | None = None) -> list[SigningSecret]:
        """Next generation; the previous one keeps signing for ``rotation_overlap_s``."""
        if tenant.webhook_secret_ref:
            raise _external(tenant)
        now = now or utcnow()
        overlap = timedelta(seconds=self.rotation_overlap_s)
        for first_try in (True, False):
            try:
                with self._sessions() as s, s.begin():
                    q = select(WebhookSecretRow).where(WebhookSecretRow.tenant_id == tenant.id).with_for_update()
                    current = s.scalars(q).first()
                    if current is None:
                        s.add(WebhookSecretRow(tenant_id=tenant.id, generation=2, rotated_at=now, previous_until=now))
                        s.flush()
                        current = s.get(WebhookSecretRow, tenant.id)
                    else:
                        current.generation += 1
                    current.rotated_at, current.previous_until = now, now + overlap
                break
            except IntegrityError:  # a concurrent first rotation inserted the row: bump that one
                if not first_try:
                    raise
        return self.secrets(tenant.id, now)


def _external(tenant: TenantSpec) -> ExternalSecret:
    return ExternalSecret(
        f"tenant {tenant.id!r} signs webhooks with a secret its operator manages (webhook_secret_ref): "
        "ask them for it or to rotate it"
    )
