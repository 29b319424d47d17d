"""``ops tenants-sync``: tenant files (key hashes only) → the chart's tenants Secret / ConfigMap.

No Kubernetes API server can run here: a fake one on 127.0.0.1 (``fakeapi.py``) stores what
the official client creates and patches, and records every request so the exact calls
(method, path, content type, body) are asserted.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from fakeapi import REPO, FakeApiServer, fixture, ops

SECRET = "/api/v1/namespaces/zimage/secrets/zimage-platform-tenants"


@pytest.fixture
def tenants(tmp_path: Path) -> Path:
    folder = tmp_path / "tenants"
    folder.mkdir()
    for name in ("acme-retail.yaml", "catalog-batch.yaml"):
        shutil.copy(REPO / "tenants" / name, folder / name)
    return folder


def sync(folder: Path, *extra: str) -> dict:
    code, out, err = ops("tenants-sync", "--name", "zimage-platform-tenants", "--dir", str(folder), *extra)
    assert code == 0, err
    return json.loads(out)


def test_first_sync_creates_the_secret_then_nothing_is_written(api: FakeApiServer, tenants: Path):
    assert sync(tenants)["action"] == "created"
    get, post = api.requests
    assert (get.method, get.path) == ("GET", SECRET)
    assert (post.method, post.path, post.content_type) == (
        "POST",
        "/api/v1/namespaces/zimage/secrets",
        "application/json",
    )
    body = post.body
    assert body["kind"] == "Secret" and body["type"] == "Opaque"
    assert body["metadata"]["name"] == "zimage-platform-tenants"
    assert body["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "zimage-platform"}
    assert sorted(body["data"]) == ["acme-retail.yaml", "catalog-batch.yaml"]
    # Byte for byte the operator's file: comments and key hashes, never anything else.
    assert base64.b64decode(body["data"]["acme-retail.yaml"]).decode() == (tenants / "acme-retail.yaml").read_text()

    api.requests.clear()
    assert sync(tenants)["action"] == "unchanged"
    assert [r.method for r in api.requests] == ["GET"] and not api.writes()


def test_a_changed_or_removed_tenant_is_one_json_patch_guarded_by_resource_version(api: FakeApiServer, tenants: Path):
    sync(tenants)
    version = api.objects[SECRET]["metadata"]["resourceVersion"]
    text = (tenants / "acme-retail.yaml").read_text().replace("requests_per_minute: 1200", "requests_per_minute: 6000")
    (tenants / "acme-retail.yaml").write_text(text)
    (tenants / "catalog-batch.yaml").unlink()
    api.requests.clear()
    outcome = sync(tenants)
    assert (outcome["action"], outcome["changed"], outcome["removed"]) == (
        "patched",
        ["acme-retail.yaml"],
        ["catalog-batch.yaml"],
    )
    get, patch = api.requests
    assert (get.method, get.path) == ("GET", SECRET)
    assert (patch.method, patch.path, patch.content_type) == ("PATCH", SECRET, "application/json-patch+json")
    assert patch.body[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": version}
    assert patch.body[1]["op"] == "add" and patch.body[1]["path"] == "/data"
    assert list(patch.body[1]["value"]) == ["acme-retail.yaml"]  # the removed tenant leaves the Secret
    assert patch.body[2]["path"] == "/metadata/annotations/zimage.dev~1tenants-sha256"
    stored = api.objects[SECRET]["data"]
    assert base64.b64decode(stored["acme-retail.yaml"]).decode() == text


def test_an_invalid_tenant_file_writes_nothing(api: FakeApiServer, tenants: Path):
    (tenants / "broken.yaml").write_text("id: Not A Slug\ndisplay_name: x\n")
    code, _, err = ops("tenants-sync", "--name", "zimage-platform-tenants", "--dir", str(tenants))
    assert code == 2 and "broken.yaml" in err
    assert not api.requests


def test_configmap_kind_and_dry_run(api: FakeApiServer, tenants: Path):
    outcome = sync(tenants, "--kind", "configmap", "--dry-run")
    assert outcome["action"] == "would create" and not api.writes()
    assert sync(tenants, "--kind", "configmap")["action"] == "created"
    post = api.writes()[0]
    assert post.path == "/api/v1/namespaces/zimage/configmaps" and post.body["kind"] == "ConfigMap"
    assert post.body["data"]["catalog-batch.yaml"] == (tenants / "catalog-batch.yaml").read_text()


def test_an_existing_secret_of_the_chart_is_patched_not_recreated(api: FakeApiServer, tenants: Path):
    """A Secret created by hand (no data, no annotations yet), as the API server returns it."""
    secret = fixture("secret.json")
    api.put(SECRET, secret)
    assert sync(tenants)["action"] == "patched"
    patch = api.writes()[0]
    assert patch.method == "PATCH" and patch.body[0]["value"] == secret["metadata"]["resourceVersion"]
    assert patch.body[-1] == {
        "op": "add",
        "path": "/metadata/annotations",
        "value": {
            "zimage.dev/tenants-sha256": api.objects[SECRET]["metadata"]["annotations"]["zimage.dev/tenants-sha256"]
        },
    }
