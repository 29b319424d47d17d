"""Tenancy: tenant definitions, API keys and authentication (rate limits and quotas follow)."""

from zimage_platform.tenancy.keys import IssuedKey, issue_key
from zimage_platform.tenancy.models import ApiKeyRecord, TenantLimits, TenantSpec
from zimage_platform.tenancy.registry import AuthError, TenantRegistry, TenantSuspended, load_pepper

__all__ = [
    "ApiKeyRecord",
    "AuthError",
    "IssuedKey",
    "TenantLimits",
    "TenantRegistry",
    "TenantSpec",
    "TenantSuspended",
    "issue_key",
    "load_pepper",
]
