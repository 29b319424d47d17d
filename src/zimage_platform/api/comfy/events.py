"""Platform job events → ComfyUI WebSocket messages, and this replica's live sockets.

A prompt's jobs report ``started``, ``progress`` (step/total per pass) and a terminal event
(from the scheduler, over a Ray handle in production). :class:`PromptRelay` turns them into the
sequence a ComfyUI client expects — ``execution_start``, ``executing`` per node, ``progress``
per sampler step, ``executed`` per output — and is plain code (tested without sockets). The
terminal messages come from the job rows (:func:`serving.prompt_view`), the same source
``/history`` reads, so both always agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from zimage_platform.api.comfy import protocol
from zimage_platform.api.streams import Stream, end_socket
from zimage_platform.errors import PlatformError

log = logging.getLogger(__name__)


class PromptRelay:
    """One prompt's progress, node by node (``plan`` is the prompt row's stored plan)."""

    def __init__(self, prompt_id: str, plan: dict[str, Any]) -> None:
        self.prompt_id = prompt_id
        self.plan = plan
        self.started = False
        self.announced: list[str] = []
        self.running: dict[int, str] = {}

    def _states(self, running: str | None) -> dict[str, tuple[float, float, str]]:
        states = {node: (1.0, 1.0, "finished") for node in self.announced if node != running}
        if running is not None:
            states[running] = (0.0, 1.0, "running")
        return states

    def _announce(self, job: int, nodes: list[str]) -> list[dict[str, Any]]:
        out = []
        for node in nodes:
            if node in self.announced:
                continue
            self.announced.append(node)
            self.running[job] = node
            out += [
                protocol.progress_state(self.prompt_id, self._states(node)),
                protocol.executing(self.prompt_id, node),
            ]
        return out

    def _start(self) -> list[dict[str, Any]]:
        if self.started:
            return []
        self.started = True
        now = protocol.now_ms()
        return [protocol.execution_start(self.prompt_id, now), protocol.execution_cached(self.prompt_id, now)]

    def _passes(self, job: dict[str, Any], until: str | None = None) -> list[str]:
        """The job's sampler nodes in pass order (with the upscale nodes before the second pass)."""
        passes = job["passes"]
        names = ["base", "hires"] if "hires" in passes else ["generate"]
        nodes: list[str] = []
        for name in names:
            if name == "hires":
                nodes += job["between"]
            nodes.append(passes[name])
            if name == until:
                break
        return nodes

    def on_event(self, index: int, event: dict[str, Any]) -> list[dict[str, Any]]:
        job = self.plan["jobs"][index]
        kind = event.get("type")
        out: list[dict[str, Any]] = []
        if kind in ("started", "progress", "succeeded"):
            out += self._start() + self._announce(index, job["pre"])
        if kind == "progress":
            pass_name = event.get("pass_") or event.get("pass") or "generate"
            out += self._announce(index, self._passes(job, until=pass_name))
            node = job["passes"].get(pass_name, job["sampler"])
            out.append(protocol.progress(self.prompt_id, node, int(event["step"]), int(event["total"])))
        elif kind == "succeeded":
            out += self._announce(index, self._passes(job) + job["post"])
            for node, files in job["outputs"].items():
                out += self._announce(index, [node])
                images = [protocol.image_ref(f["filename"], f["subfolder"], f["type"]) for f in files]
                out.append(protocol.executed(self.prompt_id, node, images))
        return out

    def current_node(self, index: int) -> str:
        """Where a job stopped: the node it was running, else its first sampler."""
        job = self.plan["jobs"][index]
        node = self.running.get(index)
        if node is None or node in job["pre"]:
            return job["passes"].get("base") or job["passes"]["generate"]
        return node

    def finish(self, terminal: dict[str, Any] | None, remaining: int) -> list[dict[str, Any]]:
        """The closing messages: the prompt's outcome (none for a prompt deleted from the queue),
        the queue size, then ``executing`` with ``node: null``."""
        out: list[dict[str, Any]] = []
        if terminal is not None:
            out += self._start()
            if terminal["type"] == "execution_success":
                out.append(protocol.progress_state(self.prompt_id, self._states(None)))
            out.append(terminal)
        out += [protocol.status(remaining), protocol.executing(self.prompt_id, None)]
        return out


@dataclass(eq=False)
class Connection:
    """One client's socket on this replica."""

    websocket: WebSocket
    tenant_id: str
    sid: str
    connected_at: datetime
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: When the client last had a prompt (a quiet socket polls the database less often).
    active_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    relayed: set[str] = field(default_factory=set)
    tasks: set[asyncio.Task] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The socket's slot in the tenant's stream cap; its caller is re-checked before each message.
    stream: Stream | None = None

    async def send(self, msg: dict[str, Any]) -> bool:
        return await self.send_all([msg])

    async def send_all(self, msgs: list[dict[str, Any]]) -> bool:
        """Send ``msgs`` back to back: a status broadcast from another task never lands inside
        a group a client reads as one step (``execution_start`` then ``execution_cached``)."""
        if not msgs:
            return True
        if self.stream is not None and (lost := await self.stream.check()) is not None:
            await self.lost(lost)
            return False
        async with self.lock:
            for msg in msgs:
                if self.websocket.client_state != WebSocketState.CONNECTED:
                    return False
                try:
                    await self.websocket.send_json(msg)
                except Exception:  # the client went away mid-send: its reader ends the connection
                    return False
            return True

    async def lost(self, exc: PlatformError) -> None:
        """The caller lost access (key revoked, tenant suspended, session ended): close with why."""
        async with self.lock:
            await end_socket(self.websocket, exc)

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.tasks, return_exceptions=True)


class SocketHub:
    """Live sockets of this replica, by tenant and client id (the only in-memory comfy state)."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str], Connection] = {}

    def register(self, conn: Connection) -> Connection | None:
        """Add ``conn``; a reconnect with the same client id replaces the old socket (as ComfyUI)."""
        previous = self._clients.get((conn.tenant_id, conn.sid))
        self._clients[(conn.tenant_id, conn.sid)] = conn
        return previous

    def unregister(self, conn: Connection) -> None:
        if self._clients.get((conn.tenant_id, conn.sid)) is conn:
            del self._clients[(conn.tenant_id, conn.sid)]

    def of_tenant(self, tenant_id: str) -> list[Connection]:
        return [c for (t, _), c in self._clients.items() if t == tenant_id]

    def notify(self, tenant_id: str, client_id: str | None) -> None:
        """A prompt for ``client_id`` was accepted here: its socket (if here) looks at once."""
        conn = self._clients.get((tenant_id, client_id or ""))
        if conn is not None:
            conn.wake.set()

    async def broadcast(self, tenant_id: str, msg: dict[str, Any]) -> None:
        for conn in self.of_tenant(tenant_id):
            await conn.send(msg)
