"""Routes for people: the login, the ComfyUI frontend's files at ``/``, its workflow templates,
and the small ComfyUI routes the frontend asks at load (``/api/extensions``, ``/api/i18n``...)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Form, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from starlette.routing import Mount

from zimage_platform.api.comfy.api_router import Tenant
from zimage_platform.api.comfy.protocol import ComfyJSONResponse
from zimage_platform.api.frontend import protocol
from zimage_platform.api.frontend.protocol import SESSION_COOKIE
from zimage_platform.api.frontend.serving import (
    FrontendFiles,
    check_origin,
    decorate,
    frontend,
    is_secure,
    template_file,
)
from zimage_platform.errors import PlatformError
from zimage_platform.workflows.catalog import MODEL_FOLDERS

pages = APIRouter(include_in_schema=False)
#: ComfyUI routes (bare and under ``/api``, as ComfyUI): tenant by key header or session cookie.
comfy_routes = APIRouter(tags=["comfyui"], default_response_class=ComfyJSONResponse)


def _page(html: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(html, status_code=status, headers=protocol.PAGE_HEADERS)


@pages.get("/")
@pages.get("/index.html")
async def root(request: Request) -> Response:
    """The frontend for a logged-in browser; the login page for everyone else."""
    service = frontend(request.app)
    if service.static is None:
        return ComfyJSONResponse(
            {"error": {"type": "frontend_not_installed", "message": "the ComfyUI frontend is not served here"}},
            status_code=404,
        )
    tenant = await asyncio.to_thread(service.session_or_none, request)
    if tenant is None:
        return _page(protocol.login_page())
    return FileResponse(service.static / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@pages.post("/login")
async def login(request: Request, api_key: Annotated[str, Form(max_length=256)] = "") -> Response:
    """Form field ``api_key``: a valid key opens a session (cookie) and goes to ``/``; a bad one
    shows the login page again with the reason (401/403)."""
    service = frontend(request.app)
    try:
        if request.headers.get("origin") or request.headers.get("referer"):
            check_origin(request, service.config.allowed_origins)  # no logging in from other sites
        done = await asyncio.to_thread(service.login, api_key)
    except PlatformError as exc:
        return _page(protocol.login_page(f"{exc.message} ({exc.code})"), exc.status)
    response = RedirectResponse("./", status_code=303, headers={"Cache-Control": "no-store"})
    response.set_cookie(
        SESSION_COOKIE,
        done.token,
        max_age=done.max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=is_secure(request, service.config.secure_cookie),
    )
    return response


@pages.get("/logout")
async def logout_page(request: Request) -> Response:
    tenant = await asyncio.to_thread(frontend(request.app).session_or_none, request)
    if tenant is None:
        return RedirectResponse("./", status_code=303)
    return _page(protocol.logout_page(tenant.id))


@pages.post("/logout")
async def logout(request: Request) -> Response:
    service = frontend(request.app)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        try:
            check_origin(request, service.config.allowed_origins)
        except PlatformError as exc:
            return _page(protocol.login_page(exc.message), exc.status)
        await asyncio.to_thread(service.sessions.end, token)
    response = RedirectResponse("./", status_code=303, headers={"Cache-Control": "no-store"})
    secure = is_secure(request, service.config.secure_cookie)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=secure)
    return response


@pages.get("/templates/{name}")
async def template(name: str) -> Response:
    """The official workflow templates (PyPI ``comfyui-workflow-templates-json``), as ComfyUI
    serves them; the indexes list the Z-Image templates, the ones this platform runs."""
    found = await asyncio.to_thread(template_file, name)
    if found is None:
        return Response(status_code=404)
    body, media_type = found
    return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})


# -- ComfyUI routes the frontend calls at load -------------------------------------------------


@comfy_routes.get("/extensions")
async def extensions(request: Request, tenant: Tenant) -> list:
    """In a worker thread: it walks the frontend's folder on disk."""
    return await asyncio.to_thread(frontend(request.app).extensions)


@comfy_routes.get("/i18n")
async def i18n(tenant: Tenant) -> dict:
    """Translations custom nodes bring (there are none: the frontend has its own)."""
    return {}


@comfy_routes.get("/workflow_templates")
async def workflow_templates(tenant: Tenant) -> dict:
    """Example workflows of custom nodes, by module (none; the official ones are at /templates)."""
    return {}


@comfy_routes.get("/global_subgraphs")
async def global_subgraphs(tenant: Tenant) -> dict:
    return {}


@comfy_routes.get("/node_replacements")
async def node_replacements(tenant: Tenant) -> dict:
    return {}


@comfy_routes.get("/experiment/models")
async def model_folders(tenant: Tenant) -> list:
    """The model folders the node lists draw from (the files are the platform's variants)."""
    return [{"name": name, "folders": []} for name in MODEL_FOLDERS]


@comfy_routes.get("/experiment/models/{folder}", response_model=None)
async def model_files(folder: str, request: Request, tenant: Tenant) -> list | Response:
    from zimage_platform.api.comfy.api_router import _service

    names = await _service(request.app).models(tenant, folder)
    if names is None:
        return Response(status_code=404)
    return [{"name": name, "pathIndex": 0} for name in names]


def install(app: FastAPI) -> None:
    """The pages, the ComfyUI routes above (bare and under ``/api``), and the frontend's files:
    one mount per top-level folder and one route per top-level file of its ``static`` folder,
    so unknown paths stay the API's 404s."""
    app.include_router(pages)
    app.include_router(comfy_routes)
    app.include_router(comfy_routes, prefix="/api", include_in_schema=False)
    service = frontend(app)
    if service.static is None:
        return
    root = service.static
    for entry in sorted(root.iterdir()):
        if entry.name == "index.html" or entry.name.startswith("."):
            continue
        if entry.is_dir():
            app.router.routes.append(Mount(f"/{entry.name}", app=FrontendFiles(root, entry.name)))
        else:
            app.add_api_route(f"/{entry.name}", _single_file(entry), methods=["GET", "HEAD"], include_in_schema=False)


def _single_file(path: Path):
    async def serve() -> Response:
        return decorate(FileResponse(path), path.name)

    return serve
