"""ComfyUI's user routes (bare and under ``/api``): ``/settings``, ``/userdata``, ``/users``.

File names arrive URL-encoded in one path segment (``/userdata/workflows%2Fa.json``, and
``/userdata/<file>/move/<dest>``), so the routes read the raw path, as ComfyUI's router does.
"""

from __future__ import annotations

import asyncio
import mimetypes
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, FastAPI, Request, Response

from zimage_platform.api.comfy.api_router import Tenant, _json
from zimage_platform.api.comfy.protocol import ComfyError, ComfyJSONResponse
from zimage_platform.api.userdata import protocol
from zimage_platform.api.userdata.serving import userdata
from zimage_platform.browser import clean_path
from zimage_platform.errors import PlatformError

router = APIRouter(tags=["comfyui"], default_response_class=ComfyJSONResponse)


def _flag(request: Request, name: str, default: str = "") -> bool:
    return request.query_params.get(name, default).lower() == "true"


def _segments(request: Request) -> list[str]:
    """The decoded path segments after ``userdata/`` (each one file name, slashes included)."""
    raw = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
    parts = raw.split("/")
    start = parts.index("userdata") + 1
    return [unquote(p) for p in parts[start:]]


async def _guarded(call, *args, **kwargs) -> Any:
    """Run a blocking store call; its refusals come back in ComfyUI's error shape."""
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except PlatformError as exc:
        raise ComfyError.from_platform(exc) from None


@router.get("/settings")
async def get_settings(request: Request, tenant: Tenant) -> dict:
    return await userdata(request.app).settings(tenant.id)


@router.get("/settings/{setting_id}")
async def get_setting(setting_id: str, request: Request, tenant: Tenant) -> Any:
    return (await userdata(request.app).settings(tenant.id)).get(setting_id)


@router.post("/settings")
async def post_settings(request: Request, tenant: Tenant) -> Response:
    body = await _json(request)
    try:
        await userdata(request.app).update_settings(tenant.id, body)
    except PlatformError as exc:
        raise ComfyError.from_platform(exc) from None
    return Response(status_code=200)


@router.post("/settings/{setting_id}")
async def post_setting(setting_id: str, request: Request, tenant: Tenant) -> Response:
    value = await _json(request)
    try:
        await userdata(request.app).set_setting(tenant.id, setting_id, value)
    except PlatformError as exc:
        raise ComfyError.from_platform(exc) from None
    return Response(status_code=200)


@router.get("/users")
async def get_users(request: Request, tenant: Tenant) -> dict:
    migrated = await asyncio.to_thread(userdata(request.app).store.has_any, tenant.id)
    return protocol.users(migrated)


@router.post("/users")
async def post_users(tenant: Tenant) -> Response:
    raise ComfyError.of(
        400, "single_user", "each tenant is one ComfyUI user here: there are no users to add (log in with a key)"
    )


@router.get("/userdata", response_model=None)
async def list_userdata(request: Request, tenant: Tenant, dir: str = "") -> list | Response:
    """``?dir=`` (required), ``recurse``, ``full_info``, ``split``: as ComfyUI lists a folder."""
    if not dir:
        return Response("Directory not provided", status_code=400)
    rows = await _guarded(userdata(request.app).store.list, tenant.id, dir, recurse=_flag(request, "recurse"))
    if rows is None:
        return Response("Directory not found", status_code=404)
    full_info, split = _flag(request, "full_info"), _flag(request, "split")
    return [protocol.listed(row, dir, full_info=full_info, split=split) for row in rows]


@router.get("/userdata/{path:path}")
async def get_userdata(request: Request, tenant: Tenant) -> Response:
    parts = _segments(request)
    if len(parts) != 1:
        return Response(status_code=404)
    row = await _guarded(userdata(request.app).store.read, tenant.id, parts[0])
    if row is None:
        return Response(status_code=404)
    media_type = mimetypes.guess_type(row.path)[0]
    if media_type not in protocol.SERVED_TYPES:  # never HTML, SVG or script from the platform's origin
        media_type = "application/octet-stream"
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    return Response(row.data, media_type=media_type, headers=headers)


@router.post("/userdata/{path:path}", response_model=None)
async def post_userdata(request: Request, tenant: Tenant) -> Any:
    """``/userdata/<file>``: write the body (``overwrite=false``: 409 if it exists);
    ``/userdata/<file>/move/<dest>``: rename. Answers the path, or its info (``full_info``)."""
    parts = _segments(request)
    overwrite = request.query_params.get("overwrite", "true") != "false"
    full_info = _flag(request, "full_info", "false")
    store = userdata(request.app).store
    if len(parts) == 1:
        limit = store.max_file_bytes
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ComfyError.of(413, "userdata_quota_exceeded", f"a user file is limited to {limit} bytes", "file")
        row = await _guarded(store.write, tenant.id, parts[0], bytes(body), overwrite=overwrite)
    elif len(parts) == 3 and parts[1] == "move":
        await _guarded(clean_path, parts[2], "dest")
        row = await _guarded(store.move, tenant.id, parts[0], parts[2], overwrite=overwrite)
        if row is None:
            return Response(status_code=404)
    else:
        return Response(status_code=404)
    return protocol.file_info(row) if full_info else row.path


@router.delete("/userdata/{path:path}")
async def delete_userdata(request: Request, tenant: Tenant) -> Response:
    parts = _segments(request)
    if len(parts) != 1 or not await _guarded(userdata(request.app).store.delete, tenant.id, parts[0]):
        return Response(status_code=404)
    return Response(status_code=204)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.include_router(router, prefix="/api", include_in_schema=False)
