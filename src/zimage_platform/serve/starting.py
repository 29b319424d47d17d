"""``503 platform_starting`` from Serve's HTTP proxy until the platform's app can take requests.

While ``zimage-platform serve`` starts (or restarts), Serve's proxy answers a request it has no
route for with a bare ``404 Path '…' not found``, which a client takes as final. Ray Serve 2.60
leaves that window open whatever the launcher deploys first:

- ``serve.start`` returns once the proxy listens (it waits for the proxy's ``ready``), and an
  app can only be deployed after that. A route reaches the proxy by long poll from the
  controller, once the controller has applied the deployment; until then every path is a 404.
  A fresh proxy listens before its first long poll returns, so even a route that already exists
  arrives a moment late.
- A small placeholder app deployed first only narrows the window. When the real app replaces
  it, the route switches to the real ingress as soon as the controller applies it, before that
  ingress has a replica: requests are then held, not answered.

So the gate sits inside the proxy, through the proxy hook Ray reads from its environment
(``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``). The hook wraps the proxy's ASGI app before the
proxy listens. The launcher sets the hook's environment before ``ray.init``, and Ray's
processes inherit it. The gate asks the proxy's own router whether a request under the
platform's route prefix would reach a running ingress replica. If not, the gate answers 503 in
the platform's error shape, with ``Retry-After``. Otherwise the request goes to Serve
untouched, so a running platform behaves as before.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from zimage_platform.api.errors import platform_error_response
from zimage_platform.errors import PlatformError

log = logging.getLogger(__name__)

#: Ray's proxy hook: the import path of a function returning Starlette middlewares.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
#: The platform's route prefix, for the proxy: paths outside it keep Serve's own answers.
ROUTE_PREFIX_ENV = "ZIMAGE_STARTING_ROUTE_PREFIX"
RETRY_AFTER_S = 5
#: Serve's own endpoints (its health and route table), answered by the proxy itself.
SERVE_PATHS = frozenset({"/-/healthz", "/-/routes"})


class PlatformStarting(PlatformError):
    """The platform's app is not serving yet (``serve`` is starting or restarting): retry later."""

    code = "platform_starting"
    status = 503

    def __init__(self, message: str, *, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def gate_environ(route_prefix: str) -> dict[str, str]:
    """What the launcher adds to its environment before ``ray.init``: the proxy, a Ray worker,
    inherits it and loads :func:`proxy_middlewares` before it listens."""
    return {PROXY_CALLBACK_ENV: f"{__name__}:{proxy_middlewares.__name__}", ROUTE_PREFIX_ENV: route_prefix}


def proxy_middlewares() -> list[Middleware]:
    """Ray's proxy hook: called once in each proxy process, as the proxy builds its HTTP app."""
    return [Middleware(StartingGate, route_prefix=os.environ.get(ROUTE_PREFIX_ENV, "/"))]


class StartingGate:
    """ASGI middleware around Serve's proxy: requests under ``route_prefix`` that the proxy
    could not hand to a running ingress replica get ``503 platform_starting``."""

    def __init__(self, app: ASGIApp, route_prefix: str = "/") -> None:
        self.app = app
        self.route_prefix = route_prefix.rstrip("/")
        self.router = _proxy_router(app)
        if self.router is None:
            log.warning("no Serve proxy router under %r: requests are not gated while the platform starts", app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.starting(_route_path(scope)):
            starting = PlatformStarting(
                "zimage-platform is starting (or stopping) and is not serving requests; retry shortly"
            )
            await platform_error_response(starting)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def starting(self, path: str) -> bool:
        """Whether Serve would answer ``path`` with its 404 (no route yet) or hold it (the
        route's ingress has no running replica yet), and the path is the platform's."""
        if self.router is None or path in SERVE_PATHS or not _under(path, self.route_prefix):
            return False
        matched = self.router.match_route(path)
        return matched is None or not matched[1].running_replicas_populated()


def _under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or below it (``prefix`` without its trailing slash)."""
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _route_path(scope: Scope) -> str:
    """The path the proxy routes on: the request's, less the ASGI root path (as Serve does)."""
    return scope.get("path", "")[len(scope.get("root_path", "")) :]


def _proxy_router(app: Any) -> Any | None:
    """The router of Serve's HTTP proxy: the one whose empty table gives the 404. The proxy is
    the innermost app of the chain the hook wraps, under Serve's request-id middleware (which
    keeps its inner app as ``_app``)."""
    for _ in range(8):
        if app is None:
            break
        router = getattr(app, "proxy_router", None)
        if router is not None:
            return router
        app = getattr(app, "app", None) or getattr(app, "_app", None)
    return None
