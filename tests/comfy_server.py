"""The platform over real HTTP on a loopback port: the in-process app (real scheduler, torch
engines, SeaweedFS S3, SQLite) served by uvicorn in its own thread, so blocking clients
(urllib, websocket-client) and browsers talk to it exactly as to a ComfyUI server."""

from __future__ import annotations

import asyncio
import socket
import threading

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """``InProcessPlatform`` + uvicorn in one event loop on a background thread. A second app
    over the same services (``replica_url``) stands in for another ingress replica: its own
    sockets and comfy state, the same database, scheduler and S3."""

    def __init__(self, config, engines) -> None:
        self.config, self.engines = config, engines
        self.port, replica_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.replica_url = f"http://127.0.0.1:{replica_port}"
        self._ports = (self.port, replica_port)
        self.platform = None
        self._servers: list = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="comfy-server", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to the fixture
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        import uvicorn

        from zimage_platform.api import create_api
        from zimage_platform.serve.inprocess import InProcessPlatform

        self.platform = InProcessPlatform(self.config, self.engines)
        await self.platform.start()
        apps = (self.platform.app, create_api(self.platform.services))
        for app, port in zip(apps, self._ports, strict=True):
            config = uvicorn.Config(
                app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
            )
            self._servers.append(uvicorn.Server(config))
        serving = [asyncio.create_task(server.serve()) for server in self._servers]
        while not all(server.started for server in self._servers) and not any(t.done() for t in serving):
            await asyncio.sleep(0.02)
        self._ready.set()
        try:
            await asyncio.gather(*serving)
        finally:
            await self.platform.stop()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        self._thread.join(60)


def browser_client(server, key: str | None = None) -> httpx.Client:
    """A client that behaves like a browser tab of this host: it keeps cookies and sends its
    Origin; logged in with ``key`` when given."""
    client = httpx.Client(base_url=server.url, timeout=60, headers={"Origin": server.url})
    if key is not None:
        response = client.post("/login", data={"api_key": key})
        assert response.status_code == 303, response.text
    return client
