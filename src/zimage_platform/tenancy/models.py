"""Tenant definitions (``tenants/*.yaml``), validated by one schema."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from zimage_platform.tenancy.policy import TenantPolicy

TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantLimits(_Strict):
    requests_per_minute: int = Field(600, ge=1)
    images_per_minute: int = Field(1200, ge=1)
    concurrent_jobs: int = Field(64, ge=1)
    #: Images per calendar month (UTC); ``None``: unlimited.
    monthly_images: int | None = Field(None, ge=0)
    #: Largest output, in pixels (1024x1024 = 1048576); ``None``: any configured bucket.
    max_pixels: int | None = Field(None, ge=64 * 64)
    #: Variants this tenant may use; empty: all.
    allowed_variants: list[str] = Field(default_factory=list)


class ApiKeyRecord(_Strict):
    id: str
    #: HMAC-SHA256 of the key's secret part with the platform pepper (never the raw key).
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    label: str = ""


class TenantSpec(_Strict):
    id: str
    display_name: str
    plan: str = "standard"
    priority_class: Literal["realtime", "standard", "bulk"] = "standard"
    status: Literal["active", "suspended"] = "active"
    suspended_reason: str | None = None
    limits: TenantLimits = TenantLimits()
    #: Where the tenant's objects go (default ``tenants/<id>``).
    s3_prefix: str | None = None
    #: Where its webhook signing secret lives: ``env:VAR`` or ``file:/path`` (never inline).
    webhook_secret_ref: str | None = Field(None, pattern=r"^(env|file):.+$")
    #: Changes to the shared content policy for this tenant.
    policy: TenantPolicy | None = None
    api_keys: list[ApiKeyRecord] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not TENANT_ID.match(value):
            raise ValueError("tenant id must be 2-63 lowercase letters, digits or dashes")
        return value
