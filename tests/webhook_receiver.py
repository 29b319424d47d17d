"""A webhook receiver for tests: a real HTTP server on loopback that verifies Standard Webhooks
signatures like a tenant's would and answers each path from a script."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import uvicorn
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass(frozen=True)
class Step:
    """One scripted answer of the receiver."""

    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    at: float


class Receiver:
    """A webhook receiver that verifies every request like a tenant's would, and answers from a script."""

    def __init__(self, secret: str) -> None:
        #: The secret a path's requests must verify with (``secrets[name]``, else ``secret``).
        self.secret = secret
        self.secrets: dict[str, str] = {}
        self.calls: list[Call] = []
        #: Requests being answered now, and the most at once, per path.
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        self.scripts: dict[str, list[Step]] = {}
        self.app = Starlette(routes=[Route("/{name}", self.handle, methods=["POST"])])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def url(self, name: str, *steps: Step) -> str:
        """``/name`` answers ``steps`` in turn (the last repeats; none: 200)."""
        self.scripts[name] = list(steps) or [Step()]
        return f"{self.base_url}/{name}"

    def reset(self) -> Receiver:
        self.calls.clear()
        self.scripts.clear()
        self.secrets.clear()
        self.max_inflight.clear()
        return self

    def calls_to(self, name: str) -> list[Call]:
        return [call for call in self.calls if call.path == f"/{name}"]

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        name = request.path_params["name"]
        try:
            Webhook(self.secrets.get(name, self.secret)).verify(body, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        self.calls.append(Call(request.url.path, headers, body, verified, time.monotonic()))
        script = self.scripts.get(name, [Step(404)])
        step = script[min(len(self.calls_to(name)), len(script)) - 1]
        self.inflight[name] += 1
        self.max_inflight[name] = max(self.max_inflight[name], self.inflight[name])
        try:
            if step.delay_s:
                await asyncio.sleep(step.delay_s)
        finally:
            self.inflight[name] -= 1
        return Response(status_code=step.status, headers=step.headers)

    def start(self) -> Receiver:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("webhook receiver did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
