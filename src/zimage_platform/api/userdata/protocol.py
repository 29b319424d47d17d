"""Wire shapes of ComfyUI's user-data routes (``app/user_manager.py``, single-user mode)."""

from __future__ import annotations

from typing import Any

from zimage_platform.browser import UserFileRow

#: Where ComfyUI keeps a user's settings, among the user's files.
SETTINGS_FILE = "comfy.settings.json"
#: Types a user file is served as when its name says so (the frontend reads them with fetch);
#: any other file is ``application/octet-stream``, so no upload runs as a page of this origin.
SERVED_TYPES = frozenset({"application/json", "text/plain", "text/csv", "image/png", "image/jpeg", "image/webp"})


def file_info(row: UserFileRow, relative_to: str = "") -> dict[str, Any]:
    """``{path, size, modified, created}`` with times in seconds, as ComfyUI's ``get_file_info``."""
    return {
        "path": row.path[len(relative_to) :] if relative_to else row.path,
        "size": row.size,
        "modified": row.modified_at.timestamp(),
        "created": row.created_at.timestamp(),
    }


def listed(row: UserFileRow, directory: str, *, full_info: bool, split: bool) -> Any:
    """One entry of ``GET /userdata?dir=``: a path relative to the folder, its parts, or its info."""
    prefix = directory.strip("/") + "/"
    if full_info:
        return file_info(row, prefix)
    relative = row.path[len(prefix) :]
    return [relative, *relative.split("/")] if split else relative


def users(migrated: bool) -> dict[str, Any]:
    """Single-user mode (ComfyUI without ``--multi-user``): each tenant is one user."""
    return {"storage": "server", "migrated": migrated}
