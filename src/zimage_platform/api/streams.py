"""Long-lived event streams (ComfyUI WebSockets, job server-sent events): a cap per tenant, and
callers who lose access lose their streams.

A stream outlives the request that authenticated it, so a tenant could hold sockets without
bound, and a revoked key or suspended tenant would keep receiving events. One registry per
ingress replica counts each tenant's open streams (``limits.max_streams_per_tenant``; over it:
SSE 429 ``too_many_streams``, WebSocket closed with 4429 and the reason), and every stream
re-checks its caller — the API key, or the browser session and its key — before each event and
every ``limits.stream_recheck_s`` in between, closing with the reason when access is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.requests import HTTPConnection
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketState

from zimage_platform.api.deps import api_key_from
from zimage_platform.api.errors import error_body
from zimage_platform.api.frontend.protocol import SESSION_COOKIE
from zimage_platform.api.frontend.serving import frontend
from zimage_platform.errors import PlatformError
from zimage_platform.tenancy import AuthError, TenantSpec
from zimage_platform.tenancy.keys import parse_key

log = logging.getLogger(__name__)

#: WebSocket close codes: over the per-tenant cap (4000 + HTTP 429), and access lost (policy violation).
WS_TOO_MANY_STREAMS = 4429
WS_ACCESS_LOST = 1008

#: Re-check of a stream's caller: raises the 401/403 :class:`PlatformError` once access is gone.
#: ``full``: also what costs a database read (the browser session row), else the in-memory checks.
Check = Callable[[bool], Awaitable[None]]


class TooManyStreams(PlatformError):
    code = "too_many_streams"
    status = 429

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class Stream:
    """One open stream: its tenant's slot (given back by :meth:`close`) and its caller's check."""

    def __init__(self, registry: StreamRegistry, tenant_id: str, check: Check) -> None:
        self.registry = registry
        self.tenant_id = tenant_id
        self._check = check
        self._checked_at = time.monotonic()  # it was authenticated just now
        self._closed = False

    @property
    def recheck_s(self) -> float:
        return self.registry.recheck_s

    async def check(self) -> PlatformError | None:
        """Why the caller lost access (key revoked or expired, tenant suspended, session ended),
        or ``None``. The full check runs at most every ``recheck_s``; a database that cannot be
        reached is no reason to cut a stream that was allowed (it is checked again next time)."""
        full = time.monotonic() - self._checked_at >= self.recheck_s
        try:
            await self._check(full)
        except PlatformError as exc:
            return exc
        except Exception:
            log.warning("cannot re-check the caller of a %s stream", self.tenant_id, exc_info=True)
            return None
        if full:
            self._checked_at = time.monotonic()
        return None

    async def watch(self, on_lost: Callable[[PlatformError], Awaitable[Any]]) -> None:
        """Check every ``recheck_s`` while nothing else happens; call ``on_lost`` once access is gone."""
        while not self._closed:
            await asyncio.sleep(self.recheck_s)
            if (lost := await self.check()) is not None:
                await on_lost(lost)
                return

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.registry._release(self.tenant_id)


class StreamRegistry:
    """This replica's open streams per tenant."""

    def __init__(self, max_per_tenant: int, recheck_s: float) -> None:
        self.max_per_tenant = max_per_tenant
        self.recheck_s = recheck_s
        self._open: Counter[str] = Counter()

    def count(self, tenant_id: str) -> int:
        return self._open[tenant_id]

    def open(self, tenant_id: str, check: Check) -> Stream:
        """A slot for a new stream of ``tenant_id``, or 429 ``too_many_streams``."""
        if self._open[tenant_id] >= self.max_per_tenant:
            raise TooManyStreams(
                f"this tenant already has {self.max_per_tenant} open event streams (WebSockets and "
                "server-sent events) on this server; close one first",
                limit=self.max_per_tenant,
            )
        self._open[tenant_id] += 1
        return Stream(self, tenant_id, check)

    def _release(self, tenant_id: str) -> None:
        self._open[tenant_id] -= 1
        if self._open[tenant_id] <= 0:
            del self._open[tenant_id]


def registry(app) -> StreamRegistry:
    found = getattr(app.state, "streams", None)
    if found is None:
        limits = app.state.services.config.limits
        found = app.state.streams = StreamRegistry(limits.max_streams_per_tenant, limits.stream_recheck_s)
    return found


def caller_check(conn: HTTPConnection, tenant: TenantSpec) -> Check:
    """How to ask again whether this caller may still read ``tenant``'s events: its API key
    (header, or the ComfyUI path prefix turned into one), else its browser session cookie."""
    tenants = conn.app.state.services.tenants
    key = api_key_from(conn.headers.get("authorization"), conn.headers.get("x-api-key"))
    parsed = parse_key(key) if key else None
    token = None if key else conn.cookies.get(SESSION_COOKIE)
    key_id = parsed[0] if parsed else None

    async def check(full: bool) -> None:
        nonlocal key_id
        if token is not None and (full or key_id is None):
            found, key_id = await asyncio.to_thread(frontend(conn.app).session_of, token)
        elif key_id is not None:
            found = await asyncio.to_thread(tenants.key_holder, key_id)
        else:
            raise AuthError("the stream's credentials can no longer be read", code="missing_api_key")
        if found.id != tenant.id:
            raise AuthError("the stream's credentials now belong to another tenant")

    return check


def open_stream(conn: HTTPConnection, tenant: TenantSpec) -> Stream:
    """Take a stream slot for the caller of ``conn`` (429 ``too_many_streams`` over the cap)."""
    return registry(conn.app).open(tenant.id, caller_check(conn, tenant))


def close_reason(exc: PlatformError) -> str:
    """``code: message``, cut to what a WebSocket close frame carries (123 bytes)."""
    return f"{exc.code}: {exc.message}".encode()[:123].decode(errors="ignore")


async def refuse_socket(websocket: WebSocket, exc: TooManyStreams) -> None:
    """Accept, then close with 4429 and the reason: a close before the handshake reaches the
    client as a bare HTTP 403, without either."""
    await websocket.accept()
    await websocket.close(code=WS_TOO_MANY_STREAMS, reason=close_reason(exc))


async def end_socket(websocket: WebSocket, exc: PlatformError) -> None:
    """Close an open socket whose caller lost access (1008 with the reason)."""
    if websocket.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):  # the client may be gone already
            await websocket.close(code=WS_ACCESS_LOST, reason=close_reason(exc))


async def guarded(stream: Stream, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """``events`` while the caller keeps access (checked before each event, and every
    ``recheck_s`` while none comes); then a last ``closed`` event with the reason. The stream's
    slot is given back when this ends."""
    source = aiter(events)
    pending: asyncio.Task | None = None

    async def next_event() -> dict[str, Any]:
        return await anext(source)

    try:
        while True:
            pending = pending or asyncio.create_task(next_event())
            done, _ = await asyncio.wait({pending}, timeout=stream.recheck_s)
            if (lost := await stream.check()) is not None:
                yield {"event": "closed", "data": json.dumps(error_body(lost.status, lost.code, lost.message))}
                return
            if not done:
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield event
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        if hasattr(source, "aclose"):
            with contextlib.suppress(Exception):
                await source.aclose()
        stream.close()


class _StreamResponse(EventSourceResponse):
    """Gives the stream's slot back however the response ends (also a client gone before the
    first event, when the event generator never started)."""

    def __init__(self, stream: Stream, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


def event_stream(
    conn: HTTPConnection, tenant: TenantSpec, events: AsyncIterator[dict[str, Any]], *, ping: int = 15
) -> EventSourceResponse:
    """Server-sent ``events`` for ``tenant``'s caller, within its stream cap (429 over it)."""
    stream = open_stream(conn, tenant)
    return _StreamResponse(stream, guarded(stream, events), ping=ping)
