"""API fuzzing: schemathesis over every operation of the platform's OpenAPI document; the
target is no 5xx at all.

How it runs, and why:

* **The platform**: the in-process platform (:mod:`zimage_platform.serve.inprocess`: the HTTP
  API, the real scheduler and engine runners) served by uvicorn on a free 127.0.0.1 port in a
  child process, with the real SQLite job store and ledger and the embedded S3 (SeaweedFS, SigV4
  checked), started the way ``serve`` starts it. The engines are the benchmarks-only simulated
  engine for every variant (GPU-timed sleeps: no CPU, placeholder images), or with
  ``--engine real`` the config's backend on the tiny checkpoint. Ray Serve is left out: its proxy
  runs no handler code, and two shared cores are better spent on cases.
* **Nothing leaves the machine**: the platform fetches URLs the fuzzer makes up (webhook
  targets, input images). The run re-executes itself in a new network namespace that has only
  loopback (``unshare --net``), so such a fetch can only fail, as it would for an unreachable host.
* **Bounded work**: requests that start generations are fuzzed like the rest (they are real
  endpoints); the fuzz tenant's limits (images per minute, concurrent jobs, largest output) keep
  the queue short enough that a synchronous request finishes within the platform's timeout. Work
  still queued when the run ends stays in the job store, as on any shutdown, and the platform
  is stopped the way a replica is (in-flight batches finish); how long that took is recorded.
* **Cases**: ``--cases`` split evenly over the operations; what an operation cannot use (its
  input space is small: ``GET /healthz`` has one case) goes to the others in a second round. Each
  operation gets schemathesis's positive and negative cases with the tenant's key and, for
  ``--unauthenticated`` of its share, cases without a valid key (whatever auth headers the
  generator made, or none). Hypothesis seeds derive from ``--seed``: a rerun makes the same cases.
* **Checks**: ``not_a_server_error`` on every answer and ``response_schema_conformance`` (it
  judges the status codes the document declares); a transport error (reset, timeout) counts too.
* **Report**: cases per operation, status codes, every 5xx with its reproducer (method, path,
  query, headers with the key as ``$ZIMAGE_API_KEY``, body, a curl line), and the routes the
  document leaves out (WebSocket, the browser frontend, aliases), with why, as not fuzzed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import (
    REPO,
    ConfigPath,
    EngineChoice,
    JsonOut,
    Render,
    Target,
    add_tenant,
    engine_description,
    engine_meta,
    log,
    markdown_table,
    read_json,
    run_meta,
    with_engine,
    write_json,
)
from bench.services import Lifecycle, free_port

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from fastapi import FastAPI
    from schemathesis import APIOperation, Case

    from zimage_platform.config import PlatformConfig

TENANT = "fuzz"
#: The fuzz tenant's limits: no request-rate limit (the cases should reach the handlers), but
#: generation bounded (images per minute, jobs at once, at most 256² output) so the queue stays
#: short: a synchronous request waits behind at most a few small jobs, never hits its timeout.
TENANT_LIMITS = {
    "requests_per_minute": 1_000_000,
    "images_per_minute": 120,
    "concurrent_jobs": 8,
    "max_pixels": 256 * 256,
}
#: The platform's synchronous-request timeout in this run, and the client's (a little longer:
#: the platform answers its own timeout before the client gives up).
SYNC_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = SYNC_TIMEOUT_S + 30
#: The key as reproducers write it (never the raw key in a result file).
KEY_PLACEHOLDER = "$ZIMAGE_API_KEY"
#: Set in the re-executed run, inside its network namespace.
NETNS_ENV = "ZIMAGE_FUZZ_NETNS"
NETWORKS = ("isolated", "host")
#: Schema-conformance failures kept per operation (all are counted).
SCHEMA_SAMPLES = 3
DEFAULT_OUT = REPO / "bench" / "results" / "fuzz.json.gz"


# -- the platform in a child process ------------------------------------------------------------


def fuzz_config(base: PlatformConfig, root: Path, engine: str) -> PlatformConfig:
    """The run's own data folder, SQLite database and tenants folder under ``root``; the embedded
    S3 on that data folder; the engine chosen; the synchronous timeout of this run."""
    config = with_engine(base, engine)
    changes: dict[str, dict[str, Any]] = {
        "paths": {"data_dir": root / "var"},
        "storage": {"embedded": True, "endpoint_url": None},
        "database": {"url": f"sqlite:///{root / 'jobs.db'}"},
        # Not data_dir/tenants: the platform adds that one itself (a folder listed twice makes
        # the registry refuse every tenant as defined twice).
        "tenancy": {"dirs": [root / "tenants"]},
        "limits": {"sync_timeout_s": SYNC_TIMEOUT_S},
    }
    return config.model_copy(update={name: getattr(config, name).model_copy(update=c) for name, c in changes.items()})


def _serve(config: PlatformConfig, port: int, conn: Connection) -> None:
    """Child process: the platform behind uvicorn until the parent says stop (or goes away)."""
    asyncio.run(_serve_async(config, port, conn))


async def _serve_async(config: PlatformConfig, port: int, conn: Connection) -> None:
    import uvicorn

    from zimage_platform.engines.engine import create_engine
    from zimage_platform.serve.inprocess import InProcessPlatform
    from zimage_platform.serve.launcher import prepare_engines

    prepare_engines(config, log=log)
    pool = next(iter(config.pools))
    engines = {}
    for variant in config.variants:
        engines[variant] = engine = create_engine(config, variant, pool)
        engine.load()
    platform = InProcessPlatform(config, engines, pool=pool)  # type: ignore[arg-type]
    await platform.start()
    settings = uvicorn.Config(
        platform.app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(settings)
    loop = asyncio.get_running_loop()

    def stop_requested() -> None:  # "stop", or EOF: the parent is gone
        loop.remove_reader(conn.fileno())
        server.should_exit = True

    try:
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if server.started:
            conn.send({"routes": route_table(platform.app)})
            loop.add_reader(conn.fileno(), stop_requested)
        await serving
    finally:
        await platform.stop()


@dataclass
class Shutdown:
    seconds: float
    exit_code: int | None
    #: Stopped in time by itself (``False``: it had to be killed).
    clean: bool


class FuzzPlatform(Lifecycle):
    """The embedded S3, a tenant with a fresh key and the platform's child process, all under
    ``/tmp/zimage-fuzz-<pid>``; ``stop`` (also on errors, via ``with``) ends them in reverse order."""

    def __init__(self, base: PlatformConfig, engine: str, *, keep: bool = False) -> None:
        self.root = Path(tempfile.gettempdir()) / f"zimage-fuzz-{os.getpid()}"
        self.config = fuzz_config(base, self.root, engine)
        self.keep = keep
        self.url = ""
        self.key = ""
        self.routes: list[dict[str, Any]] = []
        self.shutdown: Shutdown | None = None
        self._s3: Any = None
        self._process: Any = None
        self._conn: Connection | None = None

    def start(self, timeout_s: float = 600.0) -> None:
        import multiprocessing

        from zimage_platform.serve.launcher import wait_ready
        from zimage_platform.storage.embedded import embedded_s3

        self.root.mkdir(parents=True, exist_ok=False)
        log(f"starting the embedded S3 under {self.root} …")
        self._s3 = embedded_s3(self.config, owner="bench fuzz")
        s3 = self._s3.__enter__()
        os.environ.update(s3.environ())  # the child reads the credentials as boto3 does anywhere
        self.config = s3.apply(self.config)
        self.key = add_tenant(self.config, TENANT, priority_class="standard", limits=TENANT_LIMITS)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        self._process = context.Process(target=_serve, args=(self.config, port, child_end), name="fuzz-platform")
        self._process.start()
        child_end.close()
        log(f"starting the platform ({self.config.engine.backend} engines) at {self.url} …")
        if not self._conn.poll(timeout_s):
            raise RuntimeError(f"the platform did not start within {timeout_s:.0f} s")
        self.routes = self._conn.recv()["routes"]  # EOFError: it died (its traceback is above)
        wait_ready(self.url, timeout_s=timeout_s)

    def stop(self, timeout_s: float = 120.0) -> None:
        try:
            if self._process is not None and self._process.pid is not None:
                started = time.perf_counter()
                try:
                    assert self._conn is not None
                    self._conn.send("stop")
                except (OSError, AssertionError):
                    pass
                self._process.join(timeout_s)
                clean = self._process.exitcode is not None
                if not clean:
                    log(f"the platform did not stop within {timeout_s:.0f} s: killing it")
                    self._process.kill()
                    self._process.join(10)
                code = self._process.exitcode
                self.shutdown = Shutdown(time.perf_counter() - started, code, clean and code == 0)
                self._process = None
        finally:
            try:
                if self._s3 is not None:
                    self._s3.__exit__(None, None, None)
                    self._s3 = None
            finally:
                if not self.keep:
                    shutil.rmtree(self.root, ignore_errors=True)


# -- what the document leaves out ----------------------------------------------------------------


def route_table(app: FastAPI) -> list[dict[str, Any]]:
    """Every route the app answers, as the router sees it (prefixes applied), with its kind."""
    from fastapi.routing import APIWebSocketRoute, iter_route_contexts
    from starlette.routing import Mount, WebSocketRoute

    rows = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIWebSocketRoute | WebSocketRoute):
            kind = "websocket"
        elif isinstance(route, Mount):
            kind = "static"
        else:
            kind = "http"
        endpoint = getattr(route, "endpoint", None)
        rows.append(
            {
                "path": context.path,
                "methods": sorted(m for m in (context.methods or ()) if m != "HEAD"),
                "kind": kind,
                "in_schema": bool(getattr(route, "include_in_schema", False)) and kind == "http",
                "module": getattr(endpoint, "__module__", None),
            }
        )
    return rows


#: FastAPI's own pages around the document.
DOC_PAGES = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


def not_in_document(routes: list[dict[str, Any]], document: dict[str, Any]) -> list[dict[str, Any]]:
    """Routes the app serves that the document does not list (so nothing fuzzes them), with why."""
    documented = {
        (method.upper(), re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", path))
        for path, operations in document.get("paths", {}).items()
        for method in operations
    }
    out = []
    for route in routes:
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route["path"] or "")
        methods = route["methods"] or []
        if methods and all((m, path) in documented for m in methods):
            continue
        out.append({"path": path, "methods": methods, "why": _why_left_out(route, path, documented)})
    if any((r.get("module") or "").startswith("zimage_platform.api.comfy") for r in routes):
        out.append({"path": "/comfy/{key}/...", "methods": [], "why": KEY_PREFIX_WHY})
    return out


#: Not a route: ``ComfyKeyPrefix`` turns ``/comfy/<key>/<route>`` into ``/<route>`` + the key header.
KEY_PREFIX_WHY = "the key as a path prefix for unmodified ComfyUI clients, rewritten onto the documented routes"


def _why_left_out(route: dict[str, Any], path: str, documented: set[tuple[str, str]]) -> str:
    module = route.get("module") or ""
    if route["kind"] == "websocket":
        return "WebSocket (not an OpenAPI operation); ComfyUI's socket protocol is tested in tests/comfy"
    if route["kind"] == "static":
        return "static files of the ComfyUI frontend package"
    if path in DOC_PAGES:
        return "FastAPI's API documentation pages (the document itself is what is fuzzed)"
    if path.startswith("/api/") and any((m, path[len("/api") :]) in documented for m in route["methods"]):
        return "ComfyUI's `/api` alias of a documented route (same handler, fuzzed there)"
    if module.startswith("zimage_platform.api.frontend"):
        return "browser frontend (HTML pages, form login, cookie session), left out of the document"
    return f"left out of the document (include_in_schema=False, {module or 'unknown handler'})"


# -- the fuzzing ----------------------------------------------------------------------------------


@dataclass
class Part:
    """A block of one operation's cases: generation mode and whether the tenant's key is sent."""

    mode: str  # "positive" or "negative"
    auth: bool
    cases: int


@dataclass
class OperationTally:
    cases: int = 0
    authenticated: int = 0
    positive: int = 0
    statuses: Counter = field(default_factory=Counter)
    schema_failures: int = 0
    max_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def merge(self, other: OperationTally) -> None:
        self.cases += other.cases
        self.authenticated += other.authenticated
        self.positive += other.positive
        self.statuses.update(other.statuses)
        self.schema_failures += other.schema_failures
        self.max_s = max(self.max_s, other.max_s)
        self.notes += [n for n in other.notes if n not in self.notes]


@dataclass
class Tally:
    """What one task (an operation's share of cases) learned; the run merges them."""

    operations: dict[str, OperationTally] = field(default_factory=dict)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    transport_errors: list[dict[str, Any]] = field(default_factory=list)
    schema_failures: list[dict[str, Any]] = field(default_factory=list)
    #: One compact row per case: [operation, authenticated, mode, status (0: transport error), ms].
    cases: list[list[Any]] = field(default_factory=list)

    def of(self, label: str) -> OperationTally:
        return self.operations.setdefault(label, OperationTally())

    def note(self, label: str, text: str) -> None:
        """Something about an operation's cases worth reading (each distinct note once, a few)."""
        notes = self.of(label).notes
        if text[:300] not in notes and len(notes) < 10:
            notes.append(text[:300])

    def merge(self, other: Tally) -> None:
        for label, tally in other.operations.items():
            self.of(label).merge(tally)
        self.server_errors += other.server_errors
        self.transport_errors += other.transport_errors
        self.schema_failures += other.schema_failures
        self.cases += other.cases


class OutOfTime(Exception):
    """The run's time is spent: stop generating (raised inside Hypothesis, caught outside)."""


@dataclass(frozen=True)
class FuzzSettings:
    url: str
    key: str
    #: Wall-clock time (``time.time()``) at which every worker stops.
    deadline: float
    unauthenticated: float
    schema_checks: bool


def has_negative_cases(operation: APIOperation) -> bool:
    """Schemathesis can break a query or a body; not a path parameter (any string is one), nor
    the auth headers, which the key replaces: it would filter out every negative case it drew."""
    return bool(operation.query.items or operation.body.items)


class Fuzzer:
    """One worker process: the document's operations, a session, and the cases it sends."""

    def __init__(self, settings: FuzzSettings) -> None:
        import requests

        self.settings = settings
        self.key = settings.key
        self.operations = {op.label: op for op in readable_operations(load_schema(settings.url))[0]}
        self.session = requests.Session()
        self.tally = Tally()

    def out_of_time(self) -> bool:
        return time.time() >= self.settings.deadline

    def plan(self, operation: APIOperation, cases: int) -> list[Part]:
        """An operation's share: ``--unauthenticated`` of it without a valid key, the rest half
        positive, half negative with the key (all positive where nothing can be broken)."""
        unauth = round(cases * self.settings.unauthenticated) if cases > 1 else 0
        positive = (cases - unauth + 1) // 2 if has_negative_cases(operation) else cases - unauth
        parts = [Part("positive", True, positive), Part("negative", True, cases - unauth - positive)]
        return [p for p in [*parts, Part("positive", False, unauth)] if p.cases > 0]

    def run_operation(self, label: str, cases: int, seed: int) -> Tally:
        """Up to ``cases`` cases of one operation: what they found."""
        self.tally = Tally()
        operation = self.operations[label]
        self.tally.of(label)
        for index, part in enumerate(self.plan(operation, cases)):
            if not self.run_part(operation, part, seed * 7 + index):
                self.tally.note(label, "stopped: --max-time reached")
                break
        return self.tally

    def run_part(self, operation: APIOperation, part: Part, seed: int) -> bool:
        """One part's cases, drawn by Hypothesis from schemathesis's strategy (generation only: a
        5xx is recorded, not shrunk, so the reproducer is the very request that got it); ``False``
        when the run's time ran out."""
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as hypothesis_seed
        from schemathesis import GenerationMode

        mode = GenerationMode.POSITIVE if part.mode == "positive" else GenerationMode.NEGATIVE

        @settings(
            max_examples=part.cases,
            phases=[Phase.generate],
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
            report_multiple_bugs=False,
            print_blob=False,
        )
        @hypothesis_seed(seed)
        @given(case=operation.as_strategy(generation_mode=mode))
        def test(case: Case) -> None:
            if self.out_of_time():
                raise OutOfTime
            try:
                self.send(case, part)
            except Exception as exc:  # never raise into Hypothesis: it would replay and shrink
                self.tally.note(operation.label, f"case not sent: {type(exc).__name__}: {exc}")

        try:
            test()
        except OutOfTime:
            return False
        except Exception as exc:  # the generator could not make these cases (e.g. no negative ones)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            auth = "" if part.auth else ", unauthenticated"
            self.tally.note(operation.label, f"{part.mode}{auth}: {first}")
        return not self.out_of_time()

    def send(self, case: Case, part: Part) -> None:
        from schemathesis.checks import not_a_server_error
        from schemathesis.specs.openapi.checks import response_schema_conformance

        if part.auth:  # the tenant's key in place of whatever auth headers were generated
            headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in ("authorization", "x-api-key")}
            headers["Authorization"] = f"Bearer {self.key}"
            case.headers = headers
        label = case.operation.label
        tally = self.tally.of(label)
        tally.cases += 1
        tally.authenticated += part.auth
        tally.positive += part.mode == "positive"
        started = time.perf_counter()
        try:
            response = case.call(base_url=self.settings.url, session=self.session, timeout=REQUEST_TIMEOUT_S)
        except Exception as exc:
            seconds = time.perf_counter() - started
            request = getattr(exc, "request", None)
            record = {**self.reproducer(case, request), "error": f"{type(exc).__name__}: {exc}"[:1000]}
            tally.statuses["transport error"] += 1
            self.tally.transport_errors.append(record)
            self.tally.cases.append([label, int(part.auth), part.mode[0], 0, round(seconds * 1000, 1)])
            return
        seconds = time.perf_counter() - started
        status = response.status_code
        tally.statuses[str(status)] += 1
        tally.max_s = max(tally.max_s, seconds)
        self.tally.cases.append([label, int(part.auth), part.mode[0], status, round(seconds * 1000, 1)])
        checks = [not_a_server_error]
        if self.settings.schema_checks:
            checks.append(response_schema_conformance)
        try:
            case.validate_response(response, checks=checks)
        except (AssertionError, BaseExceptionGroup) as exc:  # schemathesis's failures (a group of them)
            failures = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
            text = "; ".join(_failure_text(f) for f in failures)[:1000]
            if status >= 500:
                body = response.content[:2000].decode("utf-8", "replace")
                self.tally.server_errors.append(
                    {**self.reproducer(case, response.request), "status": status, "response": body}
                )
            else:
                tally.schema_failures += 1
                if tally.schema_failures <= SCHEMA_SAMPLES:
                    self.tally.schema_failures.append(
                        {**self.reproducer(case, response.request), "status": status, "failure": text}
                    )

    def reproducer(self, case: Case, request: Any) -> dict[str, Any]:
        """The exact request sent (the prepared one, when there is one), the key replaced."""
        from urllib.parse import urlsplit

        def hide(text: str) -> str:
            return text.replace(self.key, KEY_PLACEHOLDER) if self.key else text

        out: dict[str, Any] = {"operation": case.operation.label, "method": case.method.upper()}
        if request is not None and getattr(request, "url", None):
            parts = urlsplit(request.url)
            out["path"] = parts.path
            out["query"] = parts.query
            out["headers"] = {k: hide(str(v)) for k, v in request.headers.items()}
            body = request.body
            if isinstance(body, str):
                body = body.encode("utf-8", "surrogateescape")
            if body:
                try:
                    out["body"] = hide(body[:8192].decode("utf-8"))
                except UnicodeDecodeError:
                    out["body_base64"] = base64.b64encode(body[:8192]).decode()
                if len(body) > 8192:
                    out["body_bytes"] = len(body)
        else:
            out["path"] = case.formatted_path
            out["query"] = case.query
            out["headers"] = {k: hide(str(v)) for k, v in (case.headers or {}).items()}
            out["body"] = repr(case.body)[:8192]
        with contextlib.suppress(Exception):  # curl cannot express every body (the fields above can)
            out["curl"] = hide(case.as_curl_command(base_url=self.settings.url))
        return out


def _failure_text(failure: BaseException) -> str:
    title, message = getattr(failure, "title", None), getattr(failure, "message", None)
    if title is None:
        return f"{type(failure).__name__}: {failure}"
    return f"{title}: {message}" if message else title


def load_schema(url: str):
    """The platform's document, with schemathesis's defaults (no config file read from the cwd)."""
    import schemathesis

    return schemathesis.openapi.from_url(f"{url}/openapi.json", config=schemathesis.Config())


def readable_operations(schema) -> tuple[list[APIOperation], list[dict[str, str]]]:
    """The operations schemathesis can fuzz, and those it cannot read (each one a finding)."""
    loaded, broken = [], []
    for result in schema.get_all_operations():
        try:
            loaded.append(result.ok())
        except Exception as exc:
            broken.append({"operation": str(getattr(exc, "path", "?")), "error": str(exc)[:500]})
    return loaded, broken


#: The worker process's fuzzer (one per process: Hypothesis is not made for threads).
_FUZZER: Fuzzer | None = None


def _init_worker(settings: FuzzSettings) -> None:
    global _FUZZER
    _FUZZER = Fuzzer(settings)


def _fuzz_task(label: str, cases: int, seed: int) -> Tally:
    assert _FUZZER is not None, "the worker was not initialised"
    return _FUZZER.run_operation(label, cases, seed)


def fuzz(
    url: str,
    key: str,
    *,
    cases: int,
    seed: int,
    workers: int,
    max_time: float,
    unauthenticated: float,
    schema_checks: bool,
    operations: str | None,
) -> dict[str, Any]:
    """Fuzz every operation of the document at ``url`` (matching ``operations``, a regex on
    ``METHOD /path``) in ``workers`` processes: two rounds, the second spending what the first could not."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    loaded, broken = readable_operations(load_schema(url))
    labels = [op.label for op in loaded if operations is None or re.search(operations, op.label)]
    if not labels:
        raise typer.BadParameter(f"no operation matches {operations!r}", param_hint="--operations")
    settings = FuzzSettings(url, key, time.time() + max_time, unauthenticated, schema_checks)
    started = time.monotonic()
    total = Tally()
    log(f"fuzzing {len(labels)} operations, {cases} cases, {workers} worker processes, at most {max_time:.0f} s …")

    def share(count: int, among: list[str]) -> dict[str, int]:
        return {label: count // len(among) + (i < count % len(among)) for i, label in enumerate(among)}

    def run_round(pool: ProcessPoolExecutor, budgets: dict[str, int], round_: int) -> dict[str, int]:
        futures = {
            pool.submit(_fuzz_task, label, budget, (seed * 1_000_003 + labels.index(label)) * 3 + round_): label
            for label, budget in budgets.items()
            if budget > 0
        }
        sent = {}
        for future in as_completed(futures):
            label, tally = futures[future], future.result()
            total.merge(tally)
            sent[label] = tally.of(label).cases
            log(f"  {label}: {sent[label]} cases ({len(total.cases)}/{cases}, {time.monotonic() - started:.0f} s)")
        return sent

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(settings,)) as pool:
        budgets = share(cases, labels)
        sent = run_round(pool, budgets, 0)
        left = cases - sum(sent.values())
        hungry = [label for label in labels if sent.get(label, 0) >= budgets[label]]
        if left > 0 and hungry and time.time() < settings.deadline:
            log(f"second round: {left} cases over the {len(hungry)} operations that used their whole share …")
            run_round(pool, share(left, hungry), 1)
    return {
        "elapsed_s": time.monotonic() - started,
        "stopped_by": "max_time" if time.time() >= settings.deadline else "cases",
        "operations": [
            {
                "operation": label,
                "cases": total.of(label).cases,
                "authenticated": total.of(label).authenticated,
                "positive": total.of(label).positive,
                "statuses": dict(sorted(total.of(label).statuses.items())),
                "schema_failures": total.of(label).schema_failures,
                "max_s": total.of(label).max_s,
                "notes": total.of(label).notes,
            }
            for label in labels
        ],
        "unreadable_operations": broken,
        "server_errors": total.server_errors,
        "transport_errors": total.transport_errors,
        "schema_failure_samples": total.schema_failures,
        "cases": total.cases,
    }


# -- running it -----------------------------------------------------------------------------------


def reexec_isolated(argv: list[str]) -> int:
    """This command again, in a new network namespace with loopback only; its exit code."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        raise typer.BadParameter(
            "`unshare` and `ip` (util-linux, iproute2) are needed to isolate the platform's outbound requests; "
            "or pass --network host where outbound requests to fuzzer-made hosts are acceptable",
            param_hint="--network",
        )
    script = 'ip link set lo up && exec "$@"'
    # Without root, a user namespace gives the right to make the network one (where enabled).
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    command = ["unshare", *user, "--net", "--", "sh", "-c", script, "sh", sys.executable, "-m", "bench", *argv]
    log("re-running inside a new network namespace (loopback only) …")
    return subprocess.run(command, env={**os.environ, NETNS_ENV: "1"}, check=False).returncode


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    statuses: Counter = Counter()
    for op in result["operations"]:
        statuses.update(op["statuses"])
    return {
        "cases": sum(op["cases"] for op in result["operations"]),
        "operations": len(result["operations"]),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": len(result["server_errors"]),
        "transport_errors": len(result["transport_errors"]),
        "schema_failures": sum(op["schema_failures"] for op in result["operations"]),
    }


def markdown(data: dict[str, Any]) -> str:
    meta, result, summary = data["meta"], data["result"], data["summary"]
    rows = [
        [
            op["operation"],
            str(op["cases"]),
            str(op["authenticated"]),
            ", ".join(f"{s}: {n}" for s, n in op["statuses"].items()),
            str(op["schema_failures"]),
            f"{op['max_s']:.2f}",
        ]
        for op in result["operations"]
    ]
    head = ["Operation", "Cases", "with key", "Statuses", "schema failures", "slowest s"]
    lines = [markdown_table(head, rows), ""]
    lines.append(
        f"- {summary['cases']} cases over {summary['operations']} operations in {result['elapsed_s']:.0f} s "
        f"(stopped by {result['stopped_by']}); statuses: "
        + ", ".join(f"{s}: {n}" for s, n in summary["statuses"].items())
    )
    for error in result["server_errors"][:20]:
        lines.append(
            f"- **{error['status']}** `{error['method']} {error['path']}"
            f"{'?' + error['query'] if error.get('query') else ''}`: {error.get('response', '')[:200]!r}"
        )
    for error in result["transport_errors"][:10]:
        lines.append(f"- transport error `{error['method']} {error['path']}`: {error['error'][:200]}")
    for broken in result["unreadable_operations"]:
        lines.append(f"- not fuzzed, schemathesis cannot read it: {broken['operation']}: {broken['error'][:200]}")
    by_why: dict[str, list[str]] = {}
    for route in data["not_in_document"]:
        by_why.setdefault(route["why"], []).append(f"`{' '.join(route['methods']) or '*'} {route['path']}`")
    for why, routes in by_why.items():
        shown = ", ".join(routes[:6]) + (f" and {len(routes) - 6} more" if len(routes) > 6 else "")
        lines.append(f"- not fuzzed: {shown}: {why}")
    shutdown = data["platform"].get("shutdown") or {}
    lines.append(
        f"- platform shutdown: {shutdown.get('seconds', float('nan')):.1f} s, exit code {shutdown.get('exit_code')}"
        f", {'clean' if shutdown.get('clean') else 'NOT clean'}"
    )
    lines.append(f"- {engine_description(data['platform']['engine'])}")
    lines.append(f"- source {meta.get('source', '?')}; {meta.get('machine', '')}")
    lines.append("")
    targets = [
        Target("5xx responses", summary["server_errors"], 0, "≤", ""),
        Target("transport errors", summary["transport_errors"], 0, "≤", ""),
        Target("clean platform shutdown", 1.0 if shutdown.get("clean") else 0.0, 1.0, "≥", ""),
    ]
    lines += [t.line() for t in targets]
    return "\n".join(lines)


def main(
    cases: Annotated[int, typer.Option(min=1, help="Cases in all, split over the operations.")] = 10_000,
    max_time: Annotated[float, typer.Option(min=1, help="Seconds of fuzzing at most (then the run stops).")] = 900.0,
    seed: Annotated[int, typer.Option(help="Seed of the case generation: the same seed makes the same cases.")] = 0,
    workers: Annotated[int, typer.Option(min=1, max=32, help="Operations fuzzed at once (processes).")] = 3,
    unauthenticated: Annotated[
        float, typer.Option(min=0, max=1, help="Share of each operation's cases sent without a valid key.")
    ] = 0.1,
    operations: Annotated[
        str | None, typer.Option(help="Only operations whose `METHOD /path` matches this regex (reruns).")
    ] = None,
    schema_checks: Annotated[
        bool, typer.Option(help="Also check responses against the document's schemas (declared statuses).")
    ] = True,
    network: Annotated[
        str,
        typer.Option(
            help="`isolated`: run in a new network namespace (loopback only), so URLs the fuzzer makes up "
            "reach nothing; `host`: this machine's network."
        ),
    ] = "isolated",
    engine: EngineChoice = "simulated",
    config_path: ConfigPath = None,
    json_out: JsonOut = DEFAULT_OUT,
    keep: Annotated[
        bool, typer.Option(help="Keep the run's folder (database, S3 data) for a look afterwards.")
    ] = False,
    render: Render = None,
) -> None:
    """Fuzz every operation of the OpenAPI document with schemathesis on a real server; 0 5xx is the target."""
    if render is not None:
        print(markdown(read_json(render)))
        return
    if network not in NETWORKS:
        raise typer.BadParameter(f"{network!r}: choose from {', '.join(NETWORKS)}", param_hint="--network")
    if network == "isolated" and os.environ.get(NETNS_ENV) != "1":
        raise typer.Exit(reexec_isolated(sys.argv[1:]))
    from zimage_platform.config import load_config

    meta = run_meta(
        sys.argv[1:],
        cases=cases,
        seed=seed,
        workers=workers,
        max_time_s=max_time,
        unauthenticated=unauthenticated,
        network=network,
    )
    meta["versions"]["schemathesis"] = _version("schemathesis")
    meta["versions"]["hypothesis"] = _version("hypothesis")
    with FuzzPlatform(load_config(config_path), engine, keep=keep) as platform:
        import httpx

        document = httpx.get(f"{platform.url}/openapi.json", timeout=30).json()
        result = fuzz(
            platform.url,
            platform.key,
            cases=cases,
            seed=seed,
            workers=workers,
            max_time=max_time,
            unauthenticated=unauthenticated,
            schema_checks=schema_checks,
            operations=operations,
        )
        config = platform.config
    data = {
        "meta": meta,
        "platform": {
            "engine": engine_meta(config),
            "tenant_limits": TENANT_LIMITS,
            "sync_timeout_s": SYNC_TIMEOUT_S,
            "database": "sqlite",
            "shutdown": platform.shutdown.__dict__ if platform.shutdown else None,
        },
        "summary": summarize(result),
        "not_in_document": not_in_document(platform.routes, document),
        "result": result,
    }
    print(markdown(data))
    write_json(json_out, data)
    if data["summary"]["server_errors"] or data["summary"]["transport_errors"]:
        raise typer.Exit(1)


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)
