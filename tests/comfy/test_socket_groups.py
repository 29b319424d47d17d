"""A relay's message group reaches the socket unbroken: a status broadcast from another task
lands before or after ``execution_start``/``execution_cached``, never between them (a ComfyUI
client reads the pair as one step; CI once saw a status between them)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from starlette.websockets import WebSocketState

from zimage_platform.api.comfy import protocol
from zimage_platform.api.comfy.events import Connection


class YieldingSocket:
    """A socket that yields to the event loop on every send, as a real one does under load."""

    client_state = WebSocketState.CONNECTED

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_json(self, msg: dict) -> None:
        await asyncio.sleep(0)
        self.sent.append(msg["type"])


def test_group_is_not_split_by_a_concurrent_status():
    async def scenario() -> list[str]:
        socket = YieldingSocket()
        conn = Connection(websocket=socket, tenant_id="t", sid="s", connected_at=datetime.now(UTC))  # type: ignore[arg-type]
        now = 0
        group = [protocol.execution_start("p", now), protocol.execution_cached("p", now), protocol.executing("p", "4")]
        await asyncio.gather(conn.send_all(group), conn.send(protocol.status(1)))
        return socket.sent

    sent = asyncio.run(scenario())
    assert sorted(sent) == sorted(["execution_start", "execution_cached", "executing", "status"])
    start = sent.index("execution_start")
    assert sent[start : start + 3] == ["execution_start", "execution_cached", "executing"]


def test_a_closed_socket_stops_the_group():
    async def scenario() -> tuple[bool, list[str]]:
        socket = YieldingSocket()
        conn = Connection(websocket=socket, tenant_id="t", sid="s", connected_at=datetime.now(UTC))  # type: ignore[arg-type]

        async def close_after_first(msg: dict) -> None:
            socket.sent.append(msg["type"])
            socket.client_state = WebSocketState.DISCONNECTED  # type: ignore[misc]

        socket.send_json = close_after_first  # type: ignore[method-assign]
        ok = await conn.send_all([protocol.status(0), protocol.status(0)])
        return ok, socket.sent

    ok, sent = asyncio.run(scenario())
    assert not ok and sent == ["status"]
