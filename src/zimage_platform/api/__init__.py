"""HTTP only: routers and wire schemas per feature (native jobs, OpenAI images, batches, models, health)."""

from zimage_platform.api.app import create_api
from zimage_platform.api.services import PlatformServices, SchedulerClient

__all__ = ["PlatformServices", "SchedulerClient", "create_api"]
