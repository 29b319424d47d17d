"""Webhook signing secrets: one per tenant (derived from the platform's master), rotation with an
overlap, and tenants whose operator manages their secret."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from standardwebhooks import Webhook, WebhookVerificationError

from zimage_platform.db import create_db_engine, upgrade, utcnow
from zimage_platform.scheduling.webhooks import WebhookEvent, generate_secret, sign_headers
from zimage_platform.tenancy import TenantSpec
from zimage_platform.tenancy.webhook_secrets import (
    ExternalSecret,
    WebhookSecrets,
    derive_secret,
    master_secret,
    read_secret_ref,
)

MASTER = generate_secret()
TENANTS = {
    "acme": TenantSpec(id="acme", display_name="Acme"),
    "globex": TenantSpec(id="globex", display_name="Globex"),
    "initech": TenantSpec(id="initech", display_name="Initech", webhook_secret_ref="env:INITECH_WEBHOOK_SECRET"),
}


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    upgrade(engine)
    return engine


@pytest.fixture
def secrets(engine: Engine) -> WebhookSecrets:
    return WebhookSecrets(MASTER, engine, TENANTS.get, rotation_overlap_s=3600)


def signed(secret: list[str], tenant: str) -> tuple[bytes, dict[str, str]]:
    event = WebhookEvent(type="job.succeeded", job_id="job_1", tenant_id=tenant)
    body = event.payload()
    return body, sign_headers(secret, event.id, body, event.created_at)


def test_every_tenant_has_its_own_secret_so_none_can_forge_anothers_events(secrets: WebhookSecrets):
    acme, globex = secrets.signing("acme"), secrets.signing("globex")
    assert len(acme) == len(globex) == 1 and acme != globex
    assert acme[0].startswith("whsec_") and MASTER not in (acme[0], globex[0])
    assert secrets.signing("acme") == acme  # stable: every replica derives the same
    # globex, knowing only its own secret, signs an event about acme: acme's receiver refuses it.
    body, headers = signed(globex, "acme")
    with pytest.raises(WebhookVerificationError):
        Webhook(acme[0]).verify(body, headers)
    body, headers = signed(acme, "acme")
    assert Webhook(acme[0]).verify(body, headers)["data"]["tenant_id"] == "acme"
    assert derive_secret(MASTER, "acme", 1) == acme[0] != derive_secret(generate_secret(), "acme", 1)


def test_rotation_signs_with_both_secrets_until_the_overlap_ends(secrets: WebhookSecrets):
    old = secrets.signing("acme")[0]
    now = utcnow()
    current, previous = secrets.rotate(TENANTS["acme"], now)
    assert (current.generation, current.expires_at) == (2, None)
    assert (previous.secret, previous.generation, previous.expires_at) == (old, 1, now + timedelta(hours=1))
    body, headers = signed(secrets.signing("acme"), "acme")
    for secret in (old, current.secret):  # a receiver on either secret accepts the event
        Webhook(secret).verify(body, headers)
    assert [s.secret for s in secrets.secrets("acme", now + timedelta(hours=2))] == [current.secret]
    third, second = secrets.rotate(TENANTS["acme"], now + timedelta(hours=3))
    assert third.generation == 3 and second.secret == current.secret
    assert secrets.signing("globex")[0] == derive_secret(MASTER, "globex", 1)  # others untouched


def test_an_operator_managed_secret_signs_but_is_neither_shown_nor_rotated(secrets, monkeypatch, tmp_path):
    monkeypatch.setenv("INITECH_WEBHOOK_SECRET", "whsec_" + "A" * 43 + "=")
    assert secrets.signing("initech") == ["whsec_" + "A" * 43 + "="]
    for call in (secrets.for_tenant, secrets.rotate):
        with pytest.raises(ExternalSecret) as err:
            call(TENANTS["initech"])
        assert err.value.status == 409 and err.value.code == "webhook_secret_external"
    monkeypatch.delenv("INITECH_WEBHOOK_SECRET")
    with pytest.raises(ValueError, match="empty or missing"):
        secrets.signing("initech")
    with pytest.raises(ValueError, match="cannot be read"):
        read_secret_ref(f"file:{tmp_path / 'missing'}")


def test_the_master_secret_file_is_made_once(tmp_path: Path):
    file = tmp_path / "secrets" / "webhook-secret"
    first = master_secret(None, file)
    assert first.startswith("whsec_") and master_secret(None, file) == first
    assert file.stat().st_mode & 0o777 == 0o600
    assert master_secret("whsec_configured", file) == "whsec_configured"
