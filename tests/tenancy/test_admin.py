"""Tenant administration from the CLI: keys shown once, rotation, revocation, expiry, suspension,
and an audit log whose hash chain exposes tampering."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import delete, update
from typer.testing import CliRunner

from zimage_platform.cli import app
from zimage_platform.config import load_config
from zimage_platform.serve.components import job_store, tenant_registry
from zimage_platform.tenancy import AuthError, TenantSuspended
from zimage_platform.tenancy.audit import AuditEventRow, AuditLog


@pytest.fixture
def cfg_file(tmp_path: Path, database_url: str) -> Path:
    path = tmp_path / "zimage-platform.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "paths": {"data_dir": str(tmp_path / "var"), "engines_dir": str(tmp_path / "engines")},
                "database": {"url": database_url},
                "tenancy": {"dirs": [str(tmp_path / "tenants")], "reload_s": 0.001},
            }
        )
    )
    return path


def cli(cfg_file: Path, *args: str) -> tuple[int, list[dict], str]:
    result = CliRunner().invoke(app, ["--config", str(cfg_file), *args], env={"ZIMAGE_ACTOR": "alice@ops"})
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    return result.exit_code, lines, result.stderr


def test_key_lifecycle_and_audit(cfg_file: Path):
    code, (created,), _ = cli(
        cfg_file,
        "tenants",
        "add",
        "shop",
        "--name",
        "Shop",
        "--priority",
        "realtime",
        "--monthly-images",
        "1000",
        "--variant",
        "turbo",
    )
    assert code == 0 and created["api_key"].startswith("zk_")
    tenant_file = (cfg_file.parent / "tenants" / "shop.yaml").read_text()
    secret = created["api_key"][len("zk_") + 12 + 1 :]
    assert created["api_key"] not in tenant_file and secret not in tenant_file
    registry = tenant_registry(load_config(cfg_file))
    assert registry.authenticate(created["api_key"]).limits.monthly_images == 1000

    code, (rotated,), _ = cli(cfg_file, "tenants", "rotate-key", "shop")
    registry.reload(force=True)
    assert registry.authenticate(rotated["api_key"]).id == registry.authenticate(created["api_key"]).id == "shop"

    old_id = created["api_key"].split("_")[1]
    assert cli(cfg_file, "tenants", "revoke-key", "shop", old_id)[0] == 0
    registry.reload(force=True)
    with pytest.raises(AuthError) as err:
        registry.authenticate(created["api_key"])
    assert err.value.code == "api_key_revoked"
    assert registry.authenticate(rotated["api_key"]).id == "shop"  # rotation without downtime

    assert cli(cfg_file, "tenants", "suspend", "shop", "--reason", "unpaid invoice")[0] == 0
    registry.reload(force=True)
    with pytest.raises(TenantSuspended) as err:
        registry.authenticate(rotated["api_key"])
    assert err.value.status == 403 and "unpaid invoice" in err.value.message
    assert cli(cfg_file, "tenants", "resume", "shop")[0] == 0

    code, events, _ = cli(cfg_file, "tenants", "audit")
    assert code == 0
    assert [e["action"] for e in reversed(events)] == [
        "tenant.created",
        "key.created",
        "key.revoked",
        "tenant.suspended",
        "tenant.resumed",
    ]
    assert all(e["actor"] == "alice@ops" and e["tenant"] == "shop" for e in events)
    code, listing, _ = cli(cfg_file, "tenants", "list")
    assert listing[0]["keys"][0]["revoked"] and not listing[0]["keys"][1]["revoked"]


def test_expired_keys_and_bad_input(cfg_file: Path):
    _, (created,), _ = cli(cfg_file, "tenants", "add", "temp", "--name", "Temp", "--key-expires-in-days", "1")
    registry = tenant_registry(load_config(cfg_file))
    later = datetime.now(UTC) + timedelta(days=2)
    with pytest.raises(AuthError) as err:
        registry.authenticate(created["api_key"], now=later)
    assert err.value.code == "api_key_expired"
    code, _, stderr = cli(cfg_file, "tenants", "add", "temp", "--name", "Again")
    assert code == 1 and "tenant_exists" in stderr
    code, _, stderr = cli(cfg_file, "tenants", "add", "Bad_Id!", "--name", "x")
    assert code == 2 and "tenant id" in stderr
    code, _, stderr = cli(cfg_file, "tenants", "revoke-key", "nobody", "abc")
    assert code == 1 and "tenant_not_found" in stderr


def test_tampering_with_the_audit_log_is_detected(cfg_file: Path):
    for name in ("a1", "a2", "a3"):
        cli(cfg_file, "tenants", "add", name, "--name", name)
    store = job_store(load_config(cfg_file))
    assert AuditLog(store.engine).verify() == []
    with store.session() as s, s.begin():
        s.execute(update(AuditEventRow).where(AuditEventRow.seq == 2).values(actor="mallory"))
    findings = AuditLog(store.engine).verify()
    assert findings == ["row 2: content does not match its hash (altered)"]
    code, _, stderr = cli(cfg_file, "tenants", "audit")
    assert code == 1 and "altered" in stderr


def test_a_cut_tail_of_the_audit_log_is_detected(cfg_file: Path):
    """Deleting the last events breaks no hash: verify() compares the log's end with its head."""
    for name in ("b1", "b2", "b3"):
        cli(cfg_file, "tenants", "add", name, "--name", name)
    store = job_store(load_config(cfg_file))
    last = AuditLog(store.engine).events(limit=1)[0].seq
    with store.session() as s, s.begin():
        s.execute(delete(AuditEventRow).where(AuditEventRow.seq >= last - 1))
    findings = AuditLog(store.engine).verify()
    assert findings == [
        f"rows {last - 1}..{last} missing at the end of the chain (its head is at row {last}) (chain_tail_missing)"
    ]
    code, _, stderr = cli(cfg_file, "tenants", "audit")
    assert code == 1 and "chain_tail_missing" in stderr
