"""A stand-in for the Kubernetes API server, on 127.0.0.1, for tests of ``zimage-platform ops``.

No Kubernetes API server can run on the machines these tests run on (no kube-apiserver in any
registry, no container engine), so the official ``kubernetes`` client talks to this instead,
over real HTTP, through a kubeconfig. It serves stored objects (recorded, real-shaped JSON),
creates them on POST, applies RFC 6902 JSON patches on PATCH (``test`` included: a stale
resourceVersion answers 422 like the real server), bumps resourceVersions, and records every
request (method, path, query, content type, JSON body) so tests assert exactly what was sent.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "test-token-not-a-secret"
FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]
RAYSERVICE = "/apis/ray.io/v1/namespaces/zimage/rayservices/zimage-platform"


def fixture(name: str) -> dict[str, Any]:
    """A recorded API object (``tests/k8s/fixtures/<name>``)."""
    return json.loads((FIXTURES / name).read_text())


def ops(*args: str, config: Path | str | None = None) -> tuple[int, str, str]:
    """Run ``zimage-platform [--config C] ops ...`` in-process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from zimage_platform.cli import app

    argv = (["--config", str(config)] if config else []) + ["ops", *args]
    result = CliRunner().invoke(app, argv)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any
    authorization: str | None


def _unescape(segment: str) -> str:
    return segment.replace("~1", "/").replace("~0", "~")


def apply_json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 add / replace / remove / test (what the client sends); raises ValueError on a failed op."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [_unescape(p) for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        kind = op["op"]
        if kind == "test":
            value = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if value != op["value"]:
                raise ValueError(f"test failed at {op['path']}: {value!r} != {op['value']!r}")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                parent.insert(int(last), op["value"]) if kind == "add" else parent.__setitem__(int(last), op["value"])
            else:
                if kind == "replace" and last not in parent:
                    raise ValueError(f"replace of a missing member {op['path']}")
                parent[last] = op["value"]
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise ValueError(f"unsupported op {kind}")
    return doc


class FakeApiServer:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.lists: dict[str, dict[str, Any]] = {}
        self.requests: list[Request] = []
        self._version = 50_000_000
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def kubeconfig(self, folder: Path, namespace: str = "zimage") -> Path:
        path = folder / "kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "ops", "user": {"token": TOKEN}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "ops", "namespace": namespace}}
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path

    def put(self, path: str, obj: dict[str, Any]) -> None:
        self.objects[path] = copy.deepcopy(obj)

    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._reply(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def _handle(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                server.requests.append(
                    Request(
                        self.command,
                        url.path,
                        parse_qs(url.query),
                        self.headers.get("Content-Type"),
                        body,
                        self.headers.get("Authorization"),
                    )
                )
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._status(401, "Unauthorized", "Unauthorized")
                    return
                path = url.path
                if self.command == "GET" and path in server.lists:
                    self._reply(200, server.lists[path])
                elif self.command == "GET":
                    if path in server.objects:
                        self._reply(200, server.objects[path])
                    else:
                        self._status(404, "NotFound", f"{path} not found")
                elif self.command == "POST":
                    target = f"{path}/{body['metadata']['name']}"
                    if target in server.objects:
                        self._status(409, "AlreadyExists", f"{target} already exists")
                        return
                    obj = copy.deepcopy(body)
                    obj["metadata"].update({"resourceVersion": server._next_version(), "uid": "uid-created"})
                    server.objects[target] = obj
                    self._reply(201, obj)
                elif self.command == "PATCH":
                    if path not in server.objects:
                        self._status(404, "NotFound", f"{path} not found")
                        return
                    if self.headers.get("Content-Type") != "application/json-patch+json":
                        self._status(415, "UnsupportedMediaType", "this fake only applies JSON patches")
                        return
                    try:
                        obj = apply_json_patch(server.objects[path], body)
                    except (ValueError, KeyError, IndexError) as exc:
                        self._status(422, "Invalid", str(exc))
                        return
                    obj["metadata"]["resourceVersion"] = server._next_version()
                    server.objects[path] = obj
                    self._reply(200, obj)
                else:
                    self._status(405, "MethodNotAllowed", self.command)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

        return Handler
