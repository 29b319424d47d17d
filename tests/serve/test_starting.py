"""While ``zimage-platform serve`` starts, its port never answers Serve's bare 404.

Serve's HTTP proxy listens before the platform's route reaches it, and the route reaches it
before the app's ingress replica runs. A client polls the port from the moment the command is
launched: until the app serves, every answer is ``503 platform_starting`` in the platform's
error shape with ``Retry-After`` (or a refused connection, before anything listens); then the
app answers as always. The platform is the drills' (``bench.drills``): the embedded default,
turbo only, on the simulated engine, which loads no model, so the start costs no engine build.
The gate's decisions on their own run on Serve's own router and middleware chain, without Ray.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from bench.drills import ServedPlatform, platform_settings
from bench.services import free_port

#: What the client polls: a route every replica answers at once, and one behind the API key.
PATHS = ("/healthz", "/v1/models")


@dataclass(frozen=True)
class Answer:
    path: str
    status: int | None  # None: no HTTP answer (``error`` says what instead)
    code: str | None = None
    retry_after: str | None = None
    error: str | None = None
    #: The body's ``error`` object when it has one, else the start of the body.
    body: object = None

    def key(self) -> tuple:
        return (self.path, self.status, self.code, self.error)


class Poller:
    """A client hammering the port in a thread, from before the launch, recording every answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                for path in PATHS:
                    self.answers.append(self._ask(client, path))
                time.sleep(0.02)

    def _ask(self, client: httpx.Client, path: str) -> Answer:
        try:
            response = client.get(self.url + path)
        except httpx.HTTPError as exc:
            return Answer(path, None, error=type(exc).__name__)
        try:
            error = response.json()["error"]
            code = error["code"]
        except (ValueError, KeyError, TypeError):
            error, code = response.text[:200], None
        return Answer(path, response.status_code, code, response.headers.get("retry-after"), body=error)

    def served(self) -> bool:
        """Both paths have had an answer from the app itself (not the starting gate)."""
        return all(any(a.path == p and a.status not in (None, 503) for a in self.answers) for p in PATHS)


def test_serve_answers_503_platform_starting_until_its_app_serves_never_404(tmp_path):
    platform = ServedPlatform(tmp_path, platform_settings(tmp_path, "simulated", None), free_port())
    try:
        with Poller(platform.url) as poller:
            platform.start(timeout_s=420)
            deadline = time.monotonic() + 30
            while not poller.served() and time.monotonic() < deadline:
                time.sleep(0.2)
        answers = list(poller.answers)
        seen = Counter(a.key() for a in answers)

        not_found = [a for a in answers if a.status == 404]
        assert not not_found, f"Serve's bare 404 while starting: {not_found[:3]}; all answers: {seen}"
        starting = [a for a in answers if a.status == 503]
        assert starting, f"the client never caught the platform starting: {seen}"
        for answer in starting:  # the platform's own error shape, as for every other error
            assert answer.code == "platform_starting", answer
            assert answer.retry_after and answer.retry_after.isdigit(), answer
            assert isinstance(answer.body, dict) and answer.body["type"] == "server_error", answer
            assert answer.body["message"], answer
        # Nothing listening yet is a refused connection; nothing is ever held or cut.
        assert {a.error for a in answers if a.status is None} <= {"ConnectError"}, seen
        # Once the app has answered, it answers everything: no going back to "starting".
        first = next(i for i, a in enumerate(answers) if a.status not in (None, 503))
        assert all(a.status not in (None, 503) for a in answers[first:]), seen

        # Then the app itself, as before: liveness, readiness, and its own errors.
        health = httpx.get(platform.url + "/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = httpx.get(platform.url + "/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
        models = httpx.get(platform.url + "/v1/models")
        assert models.status_code == 401 and models.json()["error"]["code"], models.text
    finally:
        platform.stop()


class Handle:
    """Stands in for the proxy's handle to an ingress deployment (replicas running or not)."""

    def __init__(self, running: bool) -> None:
        self.running = running

    def running_replicas_populated(self) -> bool:
        return self.running


class Proxy:
    """Serve's HTTP proxy as the hook sees it: its router (Serve's own class), answering 200."""

    def __init__(self, routes: dict[str, bool]) -> None:
        from ray.serve._private.common import DeploymentID, EndpointInfo
        from ray.serve._private.proxy_router import ProxyRouter

        self.proxy_router = ProxyRouter(lambda endpoint, info: Handle(routes[info.route]))
        self.proxy_router.update_routes(
            {DeploymentID(f"Ingress{i}", f"app{i}"): EndpointInfo(route=r) for i, r in enumerate(routes)}
        )

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"from serve"})


def ask(routes: dict[str, bool], path: str, prefix: str = "/") -> tuple[int, dict[str, str]]:
    """The status and headers the proxy, wrapped as Serve wraps it with the platform's hook, sends."""
    from ray.serve._private.http_util import _apply_middlewares

    from zimage_platform.serve import starting

    with pytest.MonkeyPatch.context() as env:
        env.setenv(starting.ROUTE_PREFIX_ENV, prefix)
        app = _apply_middlewares(Proxy(routes), starting.proxy_middlewares())
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], headers


def test_the_gate_answers_for_the_platform_only_until_its_ingress_runs():
    from zimage_platform.serve.starting import RETRY_AFTER_S

    status, headers = ask({}, "/v1/jobs")  # no route yet: Serve would answer 404
    assert status == 503 and headers["retry-after"] == str(RETRY_AFTER_S)
    assert headers["content-type"] == "application/json"
    assert ask({"/": False}, "/healthz")[0] == 503  # the route, no replica yet: Serve would hold it
    assert ask({"/": True}, "/healthz")[0] == 200  # the ingress runs: Serve's answer, untouched
    assert ask({}, "/-/healthz")[0] == 200  # Serve's own endpoints stay Serve's
    # Under a prefix, other paths keep Serve's answers; another app's route is not the platform's.
    assert ask({}, "/zimage/healthz", prefix="/zimage/")[0] == 503
    assert ask({}, "/zimagex", prefix="/zimage")[0] == 200
    assert ask({"/other": False}, "/other/x", prefix="/zimage")[0] == 200
