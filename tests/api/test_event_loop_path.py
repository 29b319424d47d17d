"""The request path stays on the event loop (and asyncio's own worker threads), never in FastAPI's
thread pool.

Under Ray Serve, the ingress replica's event loop runs without a root task anyio can find, so
every call into anyio's thread pool (what FastAPI does for a plain ``def`` route or dependency)
scans *every* task of the loop first. With a few thousand requests in flight during a bulk
flood, that scan was the ingress's largest CPU cost (a yappi profile of the burst benchmark)
and grew with the flood. Blocking work goes to ``asyncio.to_thread`` instead, which does not scan.
"""

from __future__ import annotations

import inspect

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.applications import Starlette
from starlette.routing import Router


def _sync_calls(dependant: Dependant, where: str) -> list[str]:
    found = []
    call = dependant.call
    if call is not None and not (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)):
        found.append(f"{where}: {getattr(call, '__qualname__', call)}")
    for sub in dependant.dependencies:
        found += _sync_calls(sub, where)
    return found


def _api_routes(routes) -> list[APIRoute | APIWebSocketRoute]:
    """Every API route, through included routers and mounted apps."""
    found = []
    for route in routes:
        if isinstance(route, APIRoute | APIWebSocketRoute):
            found.append(route)
        elif (router := getattr(route, "original_router", None)) is not None:  # an included router
            found += _api_routes(router.routes)
        elif isinstance(getattr(route, "app", None), Starlette | Router):
            found += _api_routes(route.app.routes)
    return found


async def test_no_route_or_dependency_runs_in_fastapis_thread_pool(platform):
    routes = _api_routes(platform.app.routes)
    assert len(routes) > 40
    sync = [call for route in routes for call in _sync_calls(route.dependant, route.path)]
    assert sync == []
