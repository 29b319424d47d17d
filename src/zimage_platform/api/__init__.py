"""HTTP only: routers and wire schemas per feature (native jobs, OpenAI images, batches, models, health).

The names below load on first use, so that a module of this package alone (``api.errors`` in
Serve's proxy, :mod:`zimage_platform.serve.starting`) does not pull in every router.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zimage_platform.api.app import create_api
    from zimage_platform.api.services import PlatformServices, SchedulerClient

__all__ = ["PlatformServices", "SchedulerClient", "create_api"]

_HOMES = {"create_api": "app", "PlatformServices": "services", "SchedulerClient": "services"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
