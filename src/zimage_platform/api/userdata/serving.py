"""Settings and user files of the ComfyUI frontend, per tenant (``browser.userdata`` keeps them)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from zimage_platform.api.services import PlatformServices
from zimage_platform.api.userdata.protocol import SETTINGS_FILE
from zimage_platform.browser import UserDataStore, UserFileRow
from zimage_platform.errors import InvalidRequest


class UserDataService:
    def __init__(self, services: PlatformServices) -> None:
        config = services.config.frontend
        self.store = UserDataStore(
            services.store.engine,
            max_file_bytes=config.userdata_max_file_bytes,
            max_total_bytes=config.userdata_max_total_bytes,
            max_files=config.userdata_max_files,
        )

    async def settings(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's settings; ``{}`` before the first save (or if the file is not an object)."""
        row = await asyncio.to_thread(self.store.read, tenant_id, SETTINGS_FILE)
        if row is None:
            return {}
        try:
            value = json.loads(row.data)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    async def update_settings(self, tenant_id: str, changes: Any) -> None:
        if not isinstance(changes, dict):
            raise InvalidRequest("settings must be a JSON object of setting id to value", code="invalid_settings")
        merged = {**await self.settings(tenant_id), **changes}
        data = json.dumps(merged, indent=4).encode()
        await asyncio.to_thread(self.store.write, tenant_id, SETTINGS_FILE, data)

    async def set_setting(self, tenant_id: str, setting_id: str, value: Any) -> None:
        await self.update_settings(tenant_id, {setting_id: value})

    async def listing(self, tenant_id: str, directory: str, *, recurse: bool) -> list[UserFileRow] | None:
        return await asyncio.to_thread(self.store.list, tenant_id, directory, recurse=recurse)


def userdata(app) -> UserDataService:
    service = getattr(app.state, "userdata", None)
    if service is None:
        service = app.state.userdata = UserDataService(app.state.services)
    return service
