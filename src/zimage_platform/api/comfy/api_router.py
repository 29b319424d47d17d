"""HTTP and WebSocket routes of the ComfyUI-compatible API (also under ``/api``, as ComfyUI).

The tenant's key comes as ``Authorization: Bearer``, ``X-API-Key``, or — for unmodified
clients that cannot add headers — a path prefix: ``/comfy/<key>/prompt``,
``ws://host/comfy/<key>/ws``. :class:`ComfyKeyPrefix` turns the prefix into an ``X-API-Key``
header before routing, so the key never reaches route names, metrics or trace attributes.
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response, WebSocket
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Receive, Scope, Send

from zimage_platform.api import deps, streams
from zimage_platform.api.body import NonFiniteNumber, loads
from zimage_platform.api.comfy import protocol
from zimage_platform.api.comfy.protocol import ComfyError, ComfyJSONResponse
from zimage_platform.api.comfy.serving import ComfyService, convert_view
from zimage_platform.api.deps import Trace
from zimage_platform.api.frontend.serving import frontend
from zimage_platform.errors import PlatformError
from zimage_platform.telemetry.tracing import span
from zimage_platform.tenancy import TenantSpec

router = APIRouter(tags=["comfyui"], default_response_class=ComfyJSONResponse)

#: First path segments of the ComfyUI routes (what a ``/comfy/<key>/`` prefix may precede).
COMFY_ROOTS = frozenset(
    {"prompt", "queue", "history", "interrupt", "view", "upload", "object_info", "system_stats"}
    | {"embeddings", "models", "features", "ws", "api", "jobs", "settings", "userdata", "users"}
    | {"extensions", "i18n", "workflow_templates", "global_subgraphs", "node_replacements", "experiment"}
)
#: Requests that change nothing (no CSRF check for them).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PREFIX = re.compile(r"^/comfy/([^/]+)(/.*)?$")
#: What stands in for a prefix key on a path that is not a ComfyUI route.
REDACTED = "-"


class ComfyKeyPrefix:
    """``/comfy/<key>/<route>`` → ``/<route>`` with the key as ``X-API-Key`` (HTTP and WebSocket)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            # Behind a route prefix (Ray Serve's, a proxy's) the path starts with the root path.
            root, path = scope.get("root_path", ""), scope.get("path", "")
            mounted = bool(root) and path.startswith(root)
            match = _PREFIX.match(path[len(root) :] if mounted else path)
            if match:
                scope = _without_key(scope, match, root if mounted else "")
        await self.app(scope, receive, send)


def _without_key(scope: Scope, match: re.Match[str], root: str) -> Scope:
    """The scope with the key out of its path: for a ComfyUI route it becomes the ``X-API-Key``;
    any other path keeps a placeholder (and 404s), so no later layer ever sees the key."""
    key, rest = match.group(1), match.group(2) or ""
    # The raw path keeps its escapes (``userdata/workflows%2Fa.json``): drop the prefix only.
    raw = scope.get("raw_path") or (root + rest).encode()
    raw_match = re.match(rb"^(.*?)/comfy/[^/]+(/.*)?$", raw)
    raw_rest = (raw_match.group(2) or b"") if raw_match else rest.encode()
    raw_root = raw_match.group(1) if raw_match else root.encode()
    headers = [(k, v) for k, v in scope["headers"] if k != b"x-api-key"]
    if rest.partition("/")[2].split("/")[0] not in COMFY_ROOTS:
        return {
            **scope,
            "path": f"{root}/comfy/{REDACTED}{rest}",
            "raw_path": raw_root + b"/comfy/" + REDACTED.encode() + raw_rest,
        }
    if not any(k == b"authorization" for k, _ in headers):
        headers.append((b"x-api-key", key.encode("latin-1")))
    return {**scope, "path": root + rest, "raw_path": raw_root + raw_rest, "headers": headers}


async def comfy(request: Request) -> ComfyService:
    return _service(request.app)


def _service(app) -> ComfyService:
    service = getattr(app.state, "comfy", None)
    if service is None:
        service = app.state.comfy = ComfyService(app.state.services)
    return service


async def comfy_tenant(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> TenantSpec:
    """The platform's tenant check, refusing in ComfyUI's error shape (401/403/429): a key
    header, else the browser's session cookie (CSRF-checked when the request changes state)."""
    try:
        if deps.api_key_from(authorization, x_api_key) is None:
            changes_state = request.method not in SAFE_METHODS
            with span("auth", method="session"):  # the session row is read in a worker thread
                found = await asyncio.to_thread(
                    frontend(request.app).cookie_tenant, request, changes_state=changes_state
                )
            if found is not None:
                return await deps.admit(request, found)
        return await deps.tenant(request, authorization, x_api_key)
    except PlatformError as exc:
        raise ComfyError.from_platform(exc) from None


Comfy = Annotated[ComfyService, Depends(comfy)]
Tenant = Annotated[TenantSpec, Depends(comfy_tenant)]


async def _json(request: Request, *, empty_ok: bool = False) -> Any:
    raw = await request.body()
    if not raw.strip() and empty_ok:
        return {}
    try:
        return loads(raw)
    except NonFiniteNumber as exc:
        raise ComfyError.of(400, exc.code, exc.message, "body") from None
    except ValueError:
        raise ComfyError.of(400, "invalid_json", "The request body is not valid JSON.") from None


def _ids(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ComfyError.of(400, "invalid_request", f"{name} must be a list of prompt ids", name)
    return value


@router.get("/prompt")
async def get_prompt(service: Comfy, tenant: Tenant) -> dict:
    return protocol.queue_info(await service.remaining(tenant))


@router.post("/prompt")
async def post_prompt(request: Request, service: Comfy, tenant: Tenant, trace: Trace) -> dict:
    """Queue an API-format graph: ``{prompt, client_id?, prompt_id?, extra_data?, number?, front?}``."""
    try:  # a tenant whose images window is full: refused before the graph is read and compiled
        service.services.rate_limiter.refuse_if_exhausted(tenant.id, tenant.limits.images_per_minute)
    except PlatformError as exc:
        raise ComfyError.from_platform(exc) from None
    body = await _json(request)
    with span("comfy.prompt", tenant=tenant.id):
        return await service.queue_prompt(tenant, body, trace)


@router.get("/queue")
async def get_queue(service: Comfy, tenant: Tenant) -> dict:
    return await service.queue_body(tenant)


@router.post("/queue")
async def post_queue(request: Request, service: Comfy, tenant: Tenant) -> Response:
    """``{"clear": true}`` and/or ``{"delete": [prompt_id, ...]}``: pending prompts only."""
    body = await _json(request)
    if isinstance(body, dict) and body.get("clear"):
        await service.delete_from_queue(tenant, None)
    if isinstance(body, dict) and "delete" in body:
        await service.delete_from_queue(tenant, _ids(body["delete"], "delete"))
    return Response(status_code=200)


@router.get("/history")
async def get_history(
    service: Comfy,
    tenant: Tenant,
    max_items: Annotated[int | None, Query(ge=0)] = None,
    offset: Annotated[int | None, Query(le=deps.MAX_QUERY_INT)] = None,
) -> dict:
    return await service.history(tenant, max_items=max_items, offset=offset)


@router.get("/history/{prompt_id}")
async def get_history_prompt(prompt_id: str, service: Comfy, tenant: Tenant) -> dict:
    """``{}`` until the prompt has finished (or for an id this tenant does not have)."""
    return await service.history(tenant, prompt_id)


@router.post("/history")
async def post_history(request: Request, service: Comfy, tenant: Tenant) -> Response:
    body = await _json(request)
    if isinstance(body, dict) and body.get("clear"):
        await service.delete_history(tenant, None)
    if isinstance(body, dict) and "delete" in body:
        await service.delete_history(tenant, _ids(body["delete"], "delete"))
    return Response(status_code=200)


@router.get("/jobs")
async def get_jobs(
    service: Comfy,
    tenant: Tenant,
    status: str | None = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    sort_order: str = "desc",
) -> dict:
    """The tenant's prompts as jobs (``status``: a comma-separated subset of pending,
    in_progress, completed, failed, cancelled), newest first, paginated."""
    statuses = [s.strip() for s in status.split(",") if s.strip()] if status else list(protocol.JOB_STATUSES)
    unknown = sorted(set(statuses) - set(protocol.JOB_STATUSES))
    if unknown:
        raise ComfyError.of(
            400, "invalid_status", f"unknown job status {unknown}", "status", choices=list(protocol.JOB_STATUSES)
        )
    if sort_order not in ("asc", "desc"):
        raise ComfyError.of(
            400, "invalid_sort_order", "sort_order is asc or desc", "sort_order", choices=["asc", "desc"]
        )
    return await service.jobs(tenant, statuses, limit=limit, offset=offset, newest_first=sort_order == "desc")


@router.get("/jobs/{job_id}", response_model=None)
async def get_job(job_id: str, service: Comfy, tenant: Tenant) -> dict | Response:
    found = await service.job(tenant, job_id)
    if found is None:
        raise ComfyError.of(404, "job_not_found", f"no job {job_id}", "job_id")
    return found


@router.post("/jobs/cancel")
async def cancel_jobs(request: Request, service: Comfy, tenant: Tenant) -> dict:
    """``{"job_ids": [...]}``: each is stopped (running), dropped (pending) or left (finished)."""
    body = await _json(request)
    ids = _ids(body.get("job_ids") if isinstance(body, dict) else None, "job_ids")
    return {"results": {job_id: await service.cancel_job(tenant, job_id) for job_id in ids}}


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, service: Comfy, tenant: Tenant) -> dict:
    return {"job_id": job_id, "result": await service.cancel_job(tenant, job_id)}


@router.post("/interrupt")
async def post_interrupt(request: Request, service: Comfy, tenant: Tenant) -> Response:
    """No body: stop the tenant's running prompts; ``{"prompt_id"}``: only that one, if running."""
    body = await _json(request, empty_ok=True)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    await service.interrupt(tenant, prompt_id or None)
    return Response(status_code=200)


@router.get("/view")
async def view(
    service: Comfy,
    tenant: Tenant,
    filename: str | None = None,
    subfolder: str = "",
    type: str = "output",
    preview: str | None = None,
    channel: str | None = None,
) -> Response:
    """A file by ComfyUI name, from S3: the tenant's uploads and generated images only, served
    as the image type its bytes are (PNG, JPEG, WebP; never what its name suggests)."""
    if not filename:
        return Response(status_code=404)
    if filename.startswith("/") or ".." in filename or ".." in subfolder.split("/"):
        return Response(status_code=400)
    found = await service.view(tenant, filename.rsplit("/", 1)[-1], subfolder, type)
    if found is None:
        return Response(status_code=404)
    data, name = found
    body, media_type = await asyncio.to_thread(convert_view, data, preview, channel)  # Pillow
    headers = {"Content-Disposition": protocol.content_disposition(name), "X-Content-Type-Options": "nosniff"}
    return Response(body, media_type=media_type, headers=headers)


@router.post("/upload/image")
async def upload_image(request: Request, service: Comfy, tenant: Tenant) -> dict:
    """Multipart ``image`` (+ ``type``, ``subfolder``, ``overwrite``): PNG, JPEG or WebP (by its
    bytes, decoded in a worker thread) within the platform's input-image limits; the same name
    with other bytes becomes ``name (1).png``."""
    limit = service.services.config.limits.max_input_image_bytes
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=limit + 1024)
    except Exception as exc:  # malformed multipart, or a part over the limit
        raise ComfyError.of(400, "invalid_upload", f"the upload could not be read: {exc}") from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise ComfyError.of(400, "image_missing", "the form has no image file field", "image")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ComfyError(413, protocol.error_body("image_too_large", f"image is larger than {limit} bytes", "image"))
    overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
    return await service.upload(
        tenant,
        data,
        upload.filename,
        str(form.get("type") or "input"),
        str(form.get("subfolder") or ""),
        overwrite,
    )


@router.get("/object_info")
async def get_object_info(service: Comfy, tenant: Tenant) -> dict:
    """The supported node classes, with the model names and uploaded images this tenant has."""
    return await service.object_info(tenant)


@router.get("/object_info/{node_class}")
async def get_object_info_node(node_class: str, service: Comfy, tenant: Tenant) -> dict:
    return await service.object_info(tenant, node_class)


@router.get("/system_stats")
async def get_system_stats(service: Comfy, tenant: Tenant) -> dict:
    """In a worker thread: it reads /proc and package metadata."""
    return await asyncio.to_thread(service.system_stats)


@router.get("/features")
async def get_features(service: Comfy, tenant: Tenant) -> dict:
    return service.features()


@router.get("/embeddings")
async def get_embeddings(tenant: Tenant) -> list:
    return []


@router.get("/models")
async def get_model_folders(tenant: Tenant) -> list:
    from zimage_platform.workflows.catalog import MODEL_FOLDERS

    return list(MODEL_FOLDERS)


@router.get("/models/{folder}", response_model=None)
async def get_models(folder: str, service: Comfy, tenant: Tenant) -> list | Response:
    names = await service.models(tenant, folder)
    return Response(status_code=404) if names is None else names


@router.websocket("/ws")
async def websocket(websocket: WebSocket, clientId: str | None = None) -> None:
    """``status`` on connect, then the execution messages of this client's prompts."""
    service = _service(websocket.app)
    key = deps.api_key_from(websocket.headers.get("authorization"), websocket.headers.get("x-api-key"))
    try:
        tenant = None
        if key is None:  # a browser: its session cookie, from a page of this host only
            tenant = await asyncio.to_thread(frontend(websocket.app).cookie_tenant, websocket, changes_state=True)
        if tenant is None:  # reads tenant files, hashes the key: a worker thread's work
            tenant = await asyncio.to_thread(service.services.tenants.authenticate, key)
    except PlatformError as exc:
        await websocket.close(code=1008, reason=f"{exc.code}: {exc.message}"[:120])
        return
    try:
        stream = streams.open_stream(websocket, tenant)
    except streams.TooManyStreams as exc:
        await streams.refuse_socket(websocket, exc)
        return
    try:
        await service.serve_socket(websocket, tenant, clientId or None, stream)
    finally:
        stream.close()


async def _comfy_error(_: Request, exc: ComfyError) -> ComfyJSONResponse:
    return ComfyJSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


def install(app: FastAPI) -> None:
    """Mount the routes (bare and under ``/api``) and their error shape. :class:`ComfyKeyPrefix`
    is not added here: ``create_api`` runs it before the tracing middleware, first of all."""
    app.include_router(router)
    app.include_router(router, prefix="/api", include_in_schema=False)
    app.add_exception_handler(ComfyError, _comfy_error)
