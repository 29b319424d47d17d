"""Test tenants written the way operators write them: YAML with only key hashes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import yaml

from zimage_platform.tenancy import issue_key, load_pepper


def add_tenant(config, tenant_id: str, **spec) -> str:
    """Write ``<tenants dir>/<id>.yaml`` with one fresh key; return the raw key."""
    pepper = load_pepper(config.tenancy.key_pepper, config.key_pepper_file)
    key = issue_key(pepper)
    folder = Path(config.tenancy.dirs[0])
    folder.mkdir(parents=True, exist_ok=True)
    record = {"id": key.key_id, "hash": key.hash, "created_at": datetime.now(UTC).isoformat()}
    body = {"id": tenant_id, "display_name": tenant_id.title(), **spec, "api_keys": [record, *spec.get("api_keys", [])]}
    (folder / f"{tenant_id}.yaml").write_text(yaml.safe_dump(body))
    return key.raw


def edit_tenant(config, tenant_id: str, change) -> None:
    """Change a tenant's file in place (``change(spec)`` edits the parsed YAML), as an operator would."""
    path = Path(config.tenancy.dirs[0]) / f"{tenant_id}.yaml"
    spec = yaml.safe_load(path.read_text())
    change(spec)
    path.write_text(yaml.safe_dump(spec))
