"""The ComfyUI frontend for people: its static files, the workflow templates it offers, and the
browser sessions behind them.

A person logs in once with a tenant's API key; the platform checks it and answers with a
session cookie that holds a random token (the database keeps its hash, the tenant and the
key's id, never the key). Every ComfyUI route and ``/ws`` accept that cookie instead of a key
header; each request re-checks the key's id with the tenant registry, so revoking the key or
suspending the tenant ends the session at once. Requests that change state with the cookie
must come from this host (``Origin``/``Referer``), on top of ``SameSite=Strict``.
"""

from __future__ import annotations

import json
import mimetypes
import re
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from zimage_platform.api.frontend.protocol import SESSION_COOKIE
from zimage_platform.api.services import PlatformServices
from zimage_platform.browser import SessionStore
from zimage_platform.errors import PlatformError
from zimage_platform.tenancy import AuthError, TenantSpec
from zimage_platform.tenancy.keys import parse_key

FRONTEND_PACKAGE = "comfyui_frontend_package"
TEMPLATES_PACKAGE = "comfyui_workflow_templates_json"
#: Model families of the templates offered in the template browser (the ones this platform runs).
TEMPLATE_MODELS = ("Z-Image",)
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
#: Vite names its build outputs after their content: such a file never changes under its name.
_HASHED_ASSET = re.compile(r"^assets/.+-[A-Za-z0-9_-]{8}\.[a-z0-9]+$")
_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".wasm": "application/wasm",
    ".html": "text/html",
    ".webmanifest": "application/manifest+json",
}
for _suffix, _type in _TYPES.items():
    mimetypes.add_type(_type, _suffix)


class CsrfRefused(PlatformError):
    code = "csrf_origin_mismatch"
    status = 403


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _package_folder(package: str, sub: str) -> Path | None:
    try:
        folder = Path(str(resources.files(package) / sub))
    except ModuleNotFoundError:
        return None
    return folder if folder.is_dir() else None


def frontend_root() -> Path | None:
    """The installed frontend's ``static`` folder (``index.html``, ``assets/``...), if any."""
    return _package_folder(FRONTEND_PACKAGE, "static")


def templates_root() -> Path | None:
    return _package_folder(TEMPLATES_PACKAGE, "templates")


def cache_control(path: str) -> str:
    """Content-hashed build outputs are immutable; the rest (entry points, fonts, extensions)
    is revalidated on every load, as ComfyUI serves it, so an upgrade shows at once."""
    return "public, max-age=31536000, immutable" if _HASHED_ASSET.match(path) else "no-cache"


class FrontendFiles(StaticFiles):
    """One folder of the frontend's files with their content types (JavaScript as
    ``text/javascript``, whatever the host's mime database says) and cache headers; ETag and
    304 as Starlette's static files do."""

    def __init__(self, root: Path, folder: str) -> None:
        super().__init__(directory=root / folder)
        self.root = root

    def file_response(self, full_path, stat_result, scope: Scope, status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        decorate(response, Path(str(full_path)).relative_to(self.root).as_posix())
        return response


def decorate(response: Response, path: str) -> Response:
    """Content type and caching of the frontend file at ``path`` (relative to its root)."""
    suffix = Path(path).suffix.lower()
    if suffix in _TYPES:
        response.headers["content-type"] = _TYPES[suffix] + ("; charset=utf-8" if suffix in (".js", ".css") else "")
    response.headers["Cache-Control"] = cache_control(path)
    return response


@cache
def _filtered_index(root: str, name: str) -> bytes:
    """A template index (``index.json``, ``index.<locale>.json``) reduced to the templates of the
    model families this platform serves; categories left empty are dropped."""
    data = json.loads((Path(root) / name).read_text())
    kept = []
    for category in data:
        templates = [
            t
            for t in category.get("templates", [])
            if any(str(m).startswith(TEMPLATE_MODELS) for m in t.get("models", []))
            and t.get("openSource", True)  # partner-API templates run elsewhere
            and "API" not in t.get("tags", [])
        ]
        if templates:
            kept.append({**category, "templates": templates})
    return json.dumps(kept, ensure_ascii=False).encode()


def template_file(name: str) -> tuple[bytes, str] | None:
    """A file of the workflow-template package (``/templates/<name>``): the indexes (filtered)
    and the workflows' JSON. Thumbnails ship in other packages, not installed here: None."""
    root = templates_root()
    if root is None or not _TEMPLATE_NAME.match(name) or not name.endswith(".json"):
        return None
    path = root / name
    if not path.is_file():
        return None
    if re.fullmatch(r"index(\.[A-Za-z-]+)?\.json", name) and name != "index.schema.json":
        return _filtered_index(str(root), name), "application/json"
    return path.read_bytes(), "application/json"


def request_origin(conn: HTTPConnection) -> str | None:
    """``scheme://host[:port]`` of the page that sent the request (Origin, else Referer)."""
    origin = conn.headers.get("origin")
    if origin and origin != "null":
        return origin.rstrip("/")
    referer = conn.headers.get("referer")
    if referer:
        parts = urlsplit(referer)
        if parts.scheme and parts.netloc:
            return f"{parts.scheme}://{parts.netloc}"
    return None


def check_origin(conn: HTTPConnection, allowed: list[str]) -> None:
    """The CSRF check for cookie-authenticated requests that change state (and sockets): the
    sending page must be this host (or an origin the operator allowed)."""
    origin = request_origin(conn)
    if origin is None:
        raise CsrfRefused(
            "a request that uses the session cookie must carry an Origin or Referer header", code="csrf_origin_missing"
        )
    host = conn.headers.get("x-forwarded-host") or conn.headers.get("host") or ""
    if urlsplit(origin).netloc.lower() == host.lower() or origin in {a.rstrip("/") for a in allowed}:
        return
    raise CsrfRefused(f"requests from {origin} may not use this host's session cookie")


def is_secure(conn: HTTPConnection, setting: str) -> bool:
    if setting == "always" or conn.url.scheme in ("https", "wss"):
        return True
    return conn.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower() == "https"


@dataclass
class Login:
    token: str
    tenant: TenantSpec
    max_age: int


class FrontendService:
    """The browser side of one ingress replica: sessions (in the shared database) and files."""

    def __init__(self, services: PlatformServices) -> None:
        self.services = services
        self.config = services.config.frontend
        self.sessions = SessionStore(services.store.engine)
        self.static = frontend_root() if self.config.enabled else None

    # -- sessions (blocking: call from a worker thread) -------------------------------------

    def login(self, raw_key: str) -> Login:
        """Check a pasted key like any API call (401/403 with the reason) and open a session."""
        tenant = self.services.tenants.authenticate(raw_key.strip() or None)
        key_id = parse_key(raw_key)[0]  # authenticate() accepted it: it parses
        ttl = self.config.session_ttl_s
        token, _ = self.sessions.create(tenant.id, key_id, timedelta(seconds=ttl))
        self.services.audit.record("browser.login", actor=f"key:{key_id}", tenant_id=tenant.id, key_id=key_id)
        return Login(token, tenant, ttl)

    def tenant_of(self, token: str) -> TenantSpec:
        """The tenant of a live session whose key is still good; a revoked key or suspended
        tenant ends it (401/403 with the registry's reason)."""
        return self.session_of(token)[0]

    def session_of(self, token: str) -> tuple[TenantSpec, str]:
        """:meth:`tenant_of` and the id of the session's key (open streams re-check that key
        on every event without reading the session row)."""
        row = self.sessions.get(token)
        if row is None:
            raise AuthError("the browser session has expired or was ended: log in again", code="session_expired")
        try:
            return self.services.tenants.key_holder(row.key_id), row.key_id
        except AuthError:  # the key is gone for good: so is every session opened with it
            self.sessions.end_key(row.key_id)
            raise

    def cookie_tenant(self, conn: HTTPConnection, *, changes_state: bool) -> TenantSpec | None:
        """The caller's tenant from its session cookie (None without one), CSRF-checked."""
        token = conn.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        if changes_state:
            check_origin(conn, self.config.allowed_origins)
        return self.tenant_of(token)

    def session_or_none(self, conn: HTTPConnection) -> TenantSpec | None:
        """For pages: the session's tenant, or None for no, an expired or a dead session."""
        token = conn.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        try:
            return self.tenant_of(token)
        except PlatformError:
            return None

    # -- what the frontend asks about itself -------------------------------------------------

    def extensions(self) -> list[str]:
        """The frontend's own extension scripts (ComfyUI lists ``extensions/**/*.js`` of its web
        root; there are no custom nodes here)."""
        if self.static is None:
            return []
        return sorted("/" + p.relative_to(self.static).as_posix() for p in (self.static / "extensions").rglob("*.js"))

    def versions(self) -> dict[str, Any]:
        return {
            "frontend": package_version("comfyui-frontend-package"),
            "templates": package_version("comfyui-workflow-templates-json"),
        }


def frontend(app) -> FrontendService:
    service = getattr(app.state, "frontend", None)
    if service is None:
        service = app.state.frontend = FrontendService(app.state.services)
    return service
