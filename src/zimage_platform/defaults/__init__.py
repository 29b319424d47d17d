"""Defaults shipped inside the package: the variant specs, the content policy, the tenant schema.

An installed package runs on these from any folder (``pip install``, the container images); a
checkout's ``engines/<variant>.yaml`` replaces a packaged spec of the same name, and
``tenancy.policy_file`` replaces the packaged policy (see :mod:`zimage_platform.config`).
One copy of each file lives here; nothing else in the repository duplicates them.
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from zimage_platform.errors import PlatformError

VARIANTS = "variants"
POLICY = ("policy", "default.yaml")
TENANT_SCHEMA = "tenant.schema.json"


def packaged(*parts: str) -> Traversable:
    """A file or folder of the package's defaults; a broken install is refused, never run empty."""
    item = resources.files(__name__)
    for part in parts:
        item = item / part
    if not (item.is_file() or item.is_dir()):
        raise PlatformError(
            f"{'/'.join(parts)} is missing from the installed zimage_platform package "
            f"({resources.files(__name__)}): reinstall it (pip install --force-reinstall zimage-platform)",
            code="package_data_missing",
        )
    return item


def variant_spec_files() -> dict[str, Traversable]:
    """``variant name -> spec file`` of the packaged variants (turbo, base, edit), by name."""
    files = {f.name.removesuffix(".yaml"): f for f in packaged(VARIANTS).iterdir() if f.name.endswith(".yaml")}
    if not files:
        raise PlatformError(
            f"the installed zimage_platform package holds no variant specs in {packaged(VARIANTS)}: reinstall it",
            code="package_data_missing",
        )
    return dict(sorted(files.items()))


def policy_file() -> Traversable:
    """The default content policy (bilingual blocked terms)."""
    return packaged(*POLICY)


def tenant_schema() -> dict[str, Any]:
    """The JSON Schema of tenant files (``tenants/<id>.yaml``), for editors and CI checks."""
    return json.loads(packaged(TENANT_SCHEMA).read_text())
