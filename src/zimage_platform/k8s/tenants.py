"""Tenant definitions → a Secret (or ConfigMap) the chart mounts as the tenants folder.

The files (``tenants/<id>.yaml``: plan, class, limits, API-key *hashes*) are validated by the
same registry the platform uses, then written byte for byte as ``<id>.yaml`` keys. Idempotent:
nothing is written when the object already holds exactly these files; otherwise one JSON patch
replaces the whole ``data`` (a tenant removed from the folder leaves the Secret too), guarded
by a ``test`` of the resourceVersion so a concurrent writer is never overwritten blindly.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

Kind = Literal["secret", "configmap"]
MANAGED_BY = {"app.kubernetes.io/managed-by": "zimage-platform"}
DIGEST_ANNOTATION = "zimage.dev/tenants-sha256"


def tenant_files(dirs: list[Path]) -> dict[str, str]:
    """``{"<id>.yaml": file text}`` for every valid tenant in ``dirs`` (a bad file raises)."""
    from zimage_platform.tenancy.registry import TenantRegistry

    registry = TenantRegistry(dirs, pepper=b"", reload_s=3600.0)
    files: dict[str, str] = {}
    for spec in registry.all():
        path = registry.path_of(spec.id)
        assert path is not None
        files[f"{spec.id}.yaml"] = path.read_text()
    return files


def digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return h.hexdigest()


@dataclass
class SyncOutcome:
    action: Literal["created", "patched", "unchanged", "would create", "would patch"]
    kind: Kind
    name: str
    namespace: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    digest: str = ""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _encode(kind: Kind, files: dict[str, str]) -> dict[str, str]:
    if kind == "configmap":
        return dict(files)
    return {k: base64.b64encode(v.encode()).decode() for k, v in files.items()}


def _decode(kind: Kind, data: dict[str, str] | None) -> dict[str, str]:
    if kind == "configmap":
        return dict(data or {})
    return {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}


def sync_tenants(
    api: ApiClient, namespace: str, name: str, files: dict[str, str], *, kind: Kind = "secret", dry_run: bool = False
) -> SyncOutcome:
    """Create the object, patch it to exactly ``files``, or leave it alone when it matches."""
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    core = CoreV1Api(api)
    read = core.read_namespaced_secret if kind == "secret" else core.read_namespaced_config_map
    want, sha = _encode(kind, files), digest(files)
    try:
        current = api.sanitize_for_serialization(read(name, namespace))
    except ApiException as exc:
        if exc.status != 404:
            raise
        current = None
    if current is None:
        outcome = SyncOutcome(
            "would create" if dry_run else "created", kind, name, namespace, sorted(files), digest=sha
        )
        if not dry_run:
            body: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "Secret" if kind == "secret" else "ConfigMap",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": dict(MANAGED_BY),
                    "annotations": {DIGEST_ANNOTATION: sha},
                },
                "data": want,
            }
            if kind == "secret":
                body["type"] = "Opaque"
                core.create_namespaced_secret(namespace, body)
            else:
                core.create_namespaced_config_map(namespace, body)
        return outcome
    have = _decode(kind, current.get("data"))
    annotations = current["metadata"].get("annotations") or {}
    outcome = SyncOutcome(
        "unchanged",
        kind,
        name,
        namespace,
        added=sorted(set(files) - set(have)),
        removed=sorted(set(have) - set(files)),
        changed=sorted(k for k in set(files) & set(have) if files[k] != have[k]),
        digest=sha,
    )
    if have == files and annotations.get(DIGEST_ANNOTATION) == sha:
        return outcome
    outcome.action = "would patch" if dry_run else "patched"
    if dry_run:
        return outcome
    patch: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": current["metadata"]["resourceVersion"]},
        {"op": "add", "path": "/data", "value": want},
    ]
    if annotations:
        patch.append({"op": "add", "path": "/metadata/annotations/" + _pointer(DIGEST_ANNOTATION), "value": sha})
    else:
        patch.append({"op": "add", "path": "/metadata/annotations", "value": {DIGEST_ANNOTATION: sha}})
    if kind == "secret":
        core.patch_namespaced_secret(name, namespace, patch)
    else:
        core.patch_namespaced_config_map(name, namespace, patch)
    return outcome


def _pointer(key: str) -> str:
    """A JSON-pointer segment (RFC 6901): ``~`` → ``~0``, ``/`` → ``~1``."""
    return key.replace("~", "~0").replace("/", "~1")
