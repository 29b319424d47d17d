"""Fault drills: break one part of a running platform under steady load, and prove nothing is lost.

How it runs, and why:

* The platform is ``zimage-platform serve`` in its own process group, on the embedded default
  (SeaweedFS S3 started by ``serve``, SQLite, in-memory rate limits), serving turbo only, with
  the benchmarks-only simulated engine unless ``--engine real``. A subprocess rather than
  :class:`bench.common.BenchCluster` (Ray inside the benchmark): the platform-kill drill SIGKILLs
  it and restarts it on the same data folder, as an operator (or Kubernetes) would.
  The PostgreSQL and Redis drills run on a second platform whose database is a private
  PostgreSQL and whose rate limits live in a private Redis (``bench/services.py``), so
  stopping them touches no server anyone else uses.
* Each drill has its own tenant. A load generator sends, throughout the drill, asynchronous
  ``POST /v1/jobs`` (1 or 2 images, a webhook to a local receiver) and now and then a
  synchronous ``POST /v1/images/generations``. After a warm-up the fault is injected (while a
  batch runs, for the kills), the load goes on for a while after the fault ends, then the
  drill waits (up to its deadline) until every job of its tenant is terminal and every
  terminal webhook has been acknowledged.
* Then the invariants, from the platform's own records (the job database, the ledger, the S3
  bucket listing, the billing audit) and the receiver's: every accepted job succeeded, no image
  billed twice, ledger rows = images in S3 = images delivered, a terminal webhook acknowledged
  for every terminal job that asked for webhooks, the audit clean, and (platform kill) nothing
  the killed platform started left running. :func:`check` is pure: a test runs it on a
  synthetic case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import (
    BENCH_LIMITS,
    REPO,
    VARIANT,
    EngineChoice,
    JsonOut,
    Render,
    add_tenant,
    engine_description,
    engine_meta,
    fmt_num,
    generation_body,
    log,
    markdown_table,
    percentile,
    process_name,
    read_json,
    run_meta,
    with_engine,
    write_json,
)
from bench.services import PrivatePostgres, PrivateRedis, free_port

if TYPE_CHECKING:
    import httpx
    import psutil
    from sqlalchemy import Engine

    from zimage_platform.config import PlatformConfig

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_JSON = REPO / "bench" / "results" / "drills.json"
#: The client's patience with one synchronous request (the platform's own limit is 300 s).
SYNC_TIMEOUT_S = 120.0
#: Seconds the processes of a SIGKILLed ``serve`` get to die with it.
REAP_S = 15.0


# -- the platform under test: `zimage-platform serve` in its own process group --------------------


class ServedPlatform:
    """``zimage-platform serve`` on one data folder: started, SIGKILLed, restarted, stopped.

    The config file is the one ``serve`` reads; this process reads the same file, so both agree
    on the database, the data folder (embedded S3 credentials and endpoint) and the tenants.
    """

    def __init__(self, root: Path, settings: dict[str, Any], port: int) -> None:
        import yaml

        from zimage_platform.config import load_config

        self.root = root
        self.port = port
        self.config_file = root / "zimage-platform.yaml"
        root.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(settings, sort_keys=False))
        self.config: PlatformConfig = load_config(self.config_file)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float) -> float:
        """Start ``serve`` and wait until ``/readyz`` answers 200; returns the seconds it took."""
        import httpx

        from zimage_platform.serve.launcher import RAY_ENV

        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ZIMAGE_"))}
        # Ray's workers inherit this: the platform measured is this checkout's source.
        env |= RAY_ENV | {"PYTHONPATH": str(REPO / "src")}
        self.starts += 1
        out = (self.root / f"serve-{self.starts}.log").open("ab")
        command = [sys.executable, "-m", "zimage_platform.cli", "--config", str(self.config_file), "serve"]
        started = time.monotonic()
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.root,
            start_new_session=True,
        )
        out.close()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - started
            time.sleep(1.0)
        raise TimeoutError(f"serve was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        text = (self.root / f"serve-{self.starts}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def tree(self) -> list[psutil.Process]:
        """``serve`` and every process under it: Ray's, its workers, the embedded ``weed``."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return []
        try:
            me = psutil.Process(self.process.pid)
            return [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def replica_pid(self, deployment: str) -> int:
        """The process of the (first) Serve replica of ``deployment``, by the title Ray gives it."""
        import psutil

        title = f"ServeReplica:{self.config.serve.app_name}:{deployment}"
        for process in self.tree():
            with contextlib.suppress(psutil.Error):
                if any(title in part for part in process.cmdline()):
                    return process.pid
        raise LookupError(f"no running replica of {deployment}")

    def embedded_s3(self) -> dict[str, Any]:
        """What ``serve`` recorded about its S3 (endpoint, ``weed`` pid): ``{}`` when none runs."""
        from zimage_platform.storage.embedded import state_file

        try:
            return json.loads(state_file(self.config).read_text())
        except (OSError, ValueError):
            return {}

    def s3_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` in the results bucket (the running embedded S3)."""
        import boto3

        from zimage_platform.storage.embedded import embedded_s3_credentials

        access, secret = embedded_s3_credentials(self.config)
        client = boto3.client(
            "s3",
            endpoint_url=self.embedded_s3()["endpoint_url"],
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            region_name=self.config.storage.region,
        )
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.config.storage.bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def audit(self, tenant: str, since: datetime) -> list[str]:
        """The billing audit (``zimage-platform billing audit``) of ``tenant``: its findings."""
        from zimage_platform.billing import audit
        from zimage_platform.db import create_db_engine
        from zimage_platform.storage.embedded import embedded_s3_credentials
        from zimage_platform.storage.results import ResultStore

        access, secret = embedded_s3_credentials(self.config)
        storage = self.config.storage
        results = ResultStore(
            storage.bucket,
            endpoint_url=self.embedded_s3()["endpoint_url"],
            region=storage.region,
            access_key=access,
            secret_key=secret,
        )
        engine = create_db_engine(self.config.database_url)
        try:
            today = datetime.now(UTC).date()
            found = audit(engine, results, tenant_id=tenant, start=since.date(), end=today)
        finally:
            engine.dispose()
        return [f"{f.kind}: {f.job_id}/{f.image_index} {f.detail}" for f in found]

    def sigkill(self) -> None:
        """SIGKILL ``serve`` itself, as the OOM killer would: whatever it started must die with it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """Ctrl-C, as a person stops it; SIGKILL to the group if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# -- the tenants' webhook endpoint --------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """An event the receiver acknowledged (answered 2xx)."""

    event_id: str
    type: str
    job_id: str
    at: float


class WebhookReceiver:
    """A local HTTP endpoint that acknowledges job events, or fails on purpose.

    Modes: ``up`` (200), ``down`` (503), ``hang`` (holds the request, answering nothing until the
    mode changes, so the sender's timeout fires), ``slow`` (200 after ``slow_s``). Only 2xx
    answers count as delivered.
    """

    def __init__(self, slow_s: float = 3.0) -> None:
        self.slow_s = slow_s
        self.mode = "up"
        self.acks: list[Ack] = []
        self.refused: Counter[str] = Counter()
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status = receiver._answer()
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:  # the sender gave up first
                    status = 0
                if 200 <= status < 300:
                    event = json.loads(body)
                    ack = Ack(self.headers.get("webhook-id", ""), event["type"], event["data"]["job_id"], time.time())
                    receiver.acks.append(ack)

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def start(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def set_mode(self, mode: str) -> None:
        with self._changed:
            self.mode = mode
            self._changed.notify_all()

    def _answer(self) -> int:
        with self._changed:
            mode = self.mode
            self.refused[mode] += mode != "up"
            if mode == "hang":
                self._changed.wait_for(lambda: self.mode != "hang", timeout=120)
                return 503
        if mode == "down":
            return 503
        if mode == "slow":
            time.sleep(self.slow_s)
        return 200

    def stop(self) -> None:
        self.set_mode("up")  # releases hanging requests
        self.server.shutdown()
        self.server.server_close()


# -- steady load --------------------------------------------------------------------------------


@dataclass
class Load:
    """What the clients sent during one drill and what they were told."""

    sent: int = 0
    #: Job ids the platform accepted: 202 from ``/v1/jobs``, 200 (with a job id) from the sync API.
    accepted_async: list[str] = field(default_factory=list)
    accepted_sync: list[str] = field(default_factory=list)
    #: Anything else, by ``"<status> <code>"`` or the transport error's name.
    refused: Counter[str] = field(default_factory=Counter)
    sync_latency_s: list[float] = field(default_factory=list)
    #: (epoch s sent, ok) per request: when clients saw failures.
    timeline: list[tuple[float, bool]] = field(default_factory=list)

    @property
    def accepted(self) -> list[str]:
        return self.accepted_async + self.accepted_sync

    def summary(self) -> dict[str, Any]:
        failed = [t for t, ok in self.timeline if not ok]
        return {
            "sent": self.sent,
            "accepted_async": len(self.accepted_async),
            "accepted_sync": len(self.accepted_sync),
            "refused": dict(self.refused),
            "sync_p50_s": percentile(self.sync_latency_s, 50),
            "sync_p95_s": percentile(self.sync_latency_s, 95),
            "client_errors_from": min(failed) if failed else None,
            "client_errors_to": max(failed) if failed else None,
        }


def _refusal(response: httpx.Response) -> str:
    try:
        return f"{response.status_code} {response.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return str(response.status_code)


async def steady_load(
    http: httpx.AsyncClient,
    url: str,
    key: str,
    webhook_url: str,
    load: Load,
    stop: asyncio.Event,
    *,
    size: str,
    jobs_per_s: float,
    sync_every_s: float,
) -> set[asyncio.Task]:
    """Async jobs at ``jobs_per_s`` (1 or 2 images, with a webhook) and one sync request every
    ``sync_every_s``, open loop, until ``stop``; returns the requests still waiting for answers
    (synchronous ones wait for their images)."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    pending: set[asyncio.Task] = set()

    async def submit(i: int) -> None:
        body = {"prompt": f"drill job {i}", "size": size, "n": 1 + i % 2, "steps": 8, "seed": i}
        sent_at = time.time()
        try:
            answer = await http.post(f"{url}/v1/jobs", json=body | {"webhook_url": webhook_url}, headers=headers)
        except httpx.HTTPError as exc:
            load.refused[type(exc).__name__] += 1
            load.timeline.append((sent_at, False))
            return
        if answer.status_code == 202:
            load.accepted_async.append(answer.json()["id"])
        else:
            load.refused[_refusal(answer)] += 1
        load.timeline.append((sent_at, answer.status_code == 202))

    async def generate(i: int) -> None:
        sent_at = time.time()
        try:
            answer = await http.post(
                f"{url}/v1/images/generations", json=generation_body(f"drill sync {i}", size, i), headers=headers
            )
        except httpx.HTTPError as exc:
            load.refused[f"sync {type(exc).__name__}"] += 1
            load.timeline.append((sent_at, False))
            return
        job_id = answer.json().get("job_id") if answer.status_code == 200 else None
        if job_id:
            load.accepted_sync.append(job_id)
            load.sync_latency_s.append(time.time() - sent_at)
        else:
            load.refused[f"sync {_refusal(answer)}"] += 1
        load.timeline.append((sent_at, bool(job_id)))

    def spawn(coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)

    start, i, next_sync = time.monotonic(), 0, 0.0
    while not stop.is_set():
        spawn(submit(i))
        load.sent += 1
        if time.monotonic() - start >= next_sync:
            spawn(generate(i))
            load.sent += 1
            next_sync += sync_every_s
        i += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, start + i / jobs_per_s - time.monotonic()))
    return pending


# -- what the platform's records say ------------------------------------------------------------


@dataclass(frozen=True)
class JobState:
    status: str
    attempts: int
    webhook: bool
    finished_at: float | None
    error: str | None = None


def read_jobs(engine: Engine, tenant: str) -> dict[str, JobState]:
    from sqlalchemy import select

    from zimage_platform.db import session_factory
    from zimage_platform.scheduling.models import JobRow

    columns = (JobRow.id, JobRow.status, JobRow.attempts, JobRow.webhook_url, JobRow.finished_at, JobRow.error_code)
    with session_factory(engine)() as s:
        rows = s.execute(select(*columns).where(JobRow.tenant_id == tenant)).all()
    return {
        job: JobState(status, attempts or 0, hook is not None, done.timestamp() if done else None, error)
        for job, status, attempts, hook, done, error in rows
    }


def read_images_and_ledger(
    engine: Engine, tenant: str
) -> tuple[list[tuple[str, int]], list[float], list[tuple[str, int]]]:
    """Images marked done ``(job, index)``, when each was done (epoch s), and one
    ``(job, index)`` per ledger row of ``tenant`` (a repeat would be a double bill)."""
    from sqlalchemy import select

    from zimage_platform.billing.ledger import LedgerEntryRow
    from zimage_platform.db import session_factory
    from zimage_platform.scheduling.models import JobImageRow, JobRow

    with session_factory(engine)() as s:
        images = s.execute(
            select(JobImageRow.job_id, JobImageRow.index, JobImageRow.finished_at)
            .join(JobRow, JobRow.id == JobImageRow.job_id)
            .where(JobRow.tenant_id == tenant, JobImageRow.status == "done")
        ).all()
        ledger = s.execute(
            select(LedgerEntryRow.job_id, LedgerEntryRow.image_index).where(LedgerEntryRow.tenant_id == tenant)
        ).all()
    done = [(job, index) for job, index, _ in images]
    return done, [at.timestamp() for _, _, at in images if at is not None], [(j, i) for j, i in ledger]


# -- the invariants (pure: tests run them on synthetic cases) -----------------------------------


@dataclass
class Observation:
    """Everything the invariants are judged on, read after the drill."""

    accepted: list[str]
    jobs: dict[str, JobState]
    images_done: list[tuple[str, int]]
    ledger: list[tuple[str, int]]
    s3_keys: list[str]
    acks: list[Ack]
    audit: list[str]
    #: Processes the killed platform had started that were still alive after it died (platform kill).
    orphans: list[str] | None = None
    #: What clients were told instead of a 202/200 (:attr:`Load.refused`).
    refused: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Invariant:
    name: str
    ok: bool
    value: str
    #: The offending ids, for the report (capped).
    detail: list[str] = field(default_factory=list)


def image_of_key(key: str) -> tuple[str, int] | None:
    """``tenants/<t>/<yyyy>/<mm>/<dd>/<job>/<index>.png`` → ``(job, index)``; other objects: None."""
    parts = key.split("/")
    if len(parts) < 3 or not parts[-1].endswith(".png") or not parts[-1][:-4].isdigit():
        return None
    return parts[-2], int(parts[-1][:-4])


def unexplained(refused: dict[str, int]) -> dict[str, int]:
    """Refusals a client cannot act on: a 5xx that names no cause (``internal_error``, or no
    error body). A 503 with a code (``database_unavailable``) says "retry", a 429 says when, and a
    refused connection while the platform restarts is what any client expects of a dead server."""
    found = {}
    for answer, count in refused.items():
        status, _, code = answer.removeprefix("sync ").partition(" ")
        if status.isdigit() and int(status) >= 500 and code in ("", "internal_error"):
            found[answer] = count
    return found


def check(obs: Observation) -> list[Invariant]:
    """The drill's verdict, invariant by invariant."""
    cap = 20
    states = {j: obs.jobs[j].status if j in obs.jobs else "no job row" for j in obs.accepted}
    lost = [f"{j} ({state})" for j, state in states.items() if state != "succeeded"]
    stuck = [f"{j} ({s.status})" for j, s in obs.jobs.items() if s.status not in TERMINAL]
    billed = Counter(obs.ledger)
    doubled = [f"{j}/{i} ×{n}" for (j, i), n in billed.items() if n > 1]
    in_s3 = [image for key in obs.s3_keys if (image := image_of_key(key)) is not None]
    delivered, ledger, stored = set(obs.images_done), set(billed), set(in_s3)
    mismatched = sorted(
        [f"{j}/{i} delivered, not billed" for j, i in delivered - ledger]
        + [f"{j}/{i} billed, not delivered" for j, i in ledger - delivered]
        + [f"{j}/{i} in S3, not billed" for j, i in stored - ledger]
        + [f"{j}/{i} billed, not in S3" for j, i in ledger - stored]
    )
    counts = (len(obs.ledger), len(in_s3), len(obs.images_done))
    acked = {(a.job_id, a.type) for a in obs.acks}
    owed = {j: f"job.{s.status}" for j, s in obs.jobs.items() if s.webhook and s.status in TERMINAL}
    unsent = [f"{j} ({event})" for j, event in owed.items() if (j, event) not in acked]
    vague = unexplained(obs.refused)
    found = [
        Invariant("lost", not lost, str(len(lost)), lost[:cap]),
        Invariant("stuck", not stuck, str(len(stuck)), stuck[:cap]),
        Invariant("double_billed", not doubled, str(len(doubled)), doubled[:cap]),
        Invariant(
            "ledger=s3=delivered",
            len(set(counts)) == 1 and not mismatched,
            "{} / {} / {}".format(*counts),
            mismatched[:cap],
        ),
        Invariant("webhooks", not unsent, f"{len(owed) - len(unsent)}/{len(owed)}", unsent[:cap]),
        Invariant("audit", not obs.audit, str(len(obs.audit)), obs.audit[:cap]),
        Invariant("unexplained_5xx", not vague, str(sum(vague.values())), [f"{a} ×{n}" for a, n in vague.items()]),
    ]
    if obs.orphans is not None:
        found.append(Invariant("orphans", not obs.orphans, str(len(obs.orphans)), obs.orphans[:cap]))
    return found


# -- faults -------------------------------------------------------------------------------------


@dataclass
class Fault:
    """When the fault began and ended (epoch s; a kill ends when it begins) and what it hit."""

    started_at: float
    ended_at: float
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    """The running platform and what each drill may break."""

    platform: ServedPlatform
    receiver: WebhookReceiver
    engine: Engine
    keys: dict[str, str]
    deadline: float
    postgres: PrivatePostgres | None = None
    redis: PrivateRedis | None = None
    #: Timings the drills take from the command line.
    outage_s: dict[str, float] = field(default_factory=dict)

    def running(self, tenant: str) -> list[str]:
        return [j for j, s in read_jobs(self.engine, tenant).items() if s.status == "running"]

    async def batch_running(self, tenant: str, timeout_s: float = 30.0) -> list[str]:
        """Wait until a job of ``tenant`` runs (its batch is on an engine); its job ids ([] on timeout)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            running = await asyncio.to_thread(self.running, tenant)
            if running:
                return running
            await asyncio.sleep(0.05)
        return []


async def kill_replica(stage: Stage, tenant: str, deployment: str) -> Fault:
    in_flight = await stage.batch_running(tenant)
    pid = stage.platform.replica_pid(deployment)
    os.kill(pid, signal.SIGKILL)
    now = time.time()
    return Fault(now, now, {"killed": f"{deployment} replica, pid {pid}", "jobs_in_flight": in_flight})


async def engine_kill(stage: Stage, tenant: str) -> Fault:
    from zimage_platform.serve.builder import engine_deployment_name

    pool = next(iter(stage.platform.config.pools))
    return await kill_replica(stage, tenant, engine_deployment_name(VARIANT, pool))


async def scheduler_kill(stage: Stage, tenant: str) -> Fault:
    return await kill_replica(stage, tenant, "Scheduler")


async def platform_kill(stage: Stage, tenant: str) -> Fault:
    """SIGKILL ``serve`` alone, as the OOM killer would, then ``serve`` again at once on the same
    data folder, as a person or a supervisor would (nothing cleaned up in between).

    The embedded S3 must be gone within :data:`REAP_S` (``weed`` gets the parent-death signal);
    an ``orphan`` is a ``weed`` still running then. Ray's processes die with their parents, but
    two of its agents first try to flush their logs to the dead GCS and linger for a minute or
    two: they are reported (alive after :data:`REAP_S`, alive once the restarted platform is
    ready), and the ones still alive then are ended, by PID.
    """
    import psutil

    in_flight = await stage.batch_running(tenant)
    platform = stage.platform
    tree = platform.tree()
    weed = platform.embedded_s3().get("weed_pid")
    names = {p.pid: f"{process_name(p)} (pid {p.pid})" for p in tree}
    platform.sigkill()
    killed_at = time.time()
    _, alive = await asyncio.to_thread(psutil.wait_procs, tree, REAP_S)
    lingering = [names[p.pid] for p in alive]
    log(f"serve SIGKILLed; alive {REAP_S:.0f} s later: {lingering or 'nothing'}; restarting it …")
    restart_s = await asyncio.to_thread(platform.start, max(60.0, stage.deadline - time.monotonic()))
    still = [p for p in alive if p.is_running()]
    for process in still:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return Fault(
        killed_at,
        killed_at,
        {
            "killed": f"serve (pid {tree[0].pid if tree else '?'}), parent of {len(tree) - 1} processes",
            "weed_pid": weed,
            "orphans": [names[p.pid] for p in alive if p.pid == weed],
            f"alive_{REAP_S:.0f}s_after": lingering,
            "alive_when_restarted": [names[p.pid] for p in still],
            "restart_s": restart_s,
            "jobs_in_flight": in_flight,
        },
    )


async def s3_down(stage: Stage, tenant: str) -> Fault:
    """SIGSTOP the embedded SeaweedFS: connections open but nothing answers, as in a network
    partition or a hung server (harsher than a refused connection: every call waits for its
    timeout); SIGCONT after the outage."""
    await stage.batch_running(tenant)
    weed = stage.platform.embedded_s3()["weed_pid"]
    seconds = stage.outage_s["s3"]
    os.kill(weed, signal.SIGSTOP)
    started = time.time()
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(weed, signal.SIGCONT)
    return Fault(started, time.time(), {"stopped": f"weed pid {weed} (SIGSTOP, then SIGCONT)", "seconds": seconds})


async def webhook_down(stage: Stage, tenant: str) -> Fault:
    """The tenants' receiver answers 503, then hangs (past the sender's timeout), then answers
    slowly, then recovers."""
    receiver, phases = stage.receiver, stage.outage_s
    started = time.time()
    for mode in ("down", "hang", "slow"):
        receiver.set_mode(mode)
        await asyncio.sleep(phases[f"webhook_{mode}"])
    receiver.set_mode("up")
    notes = {f"{mode}_s": phases[f"webhook_{mode}"] for mode in ("down", "hang", "slow")}
    return Fault(started, time.time(), notes | {"answers_refused": dict(receiver.refused)})


async def postgres_restart(stage: Stage, tenant: str) -> Fault:
    """``pg_ctl stop -m fast`` (connections cut), down for a while, then started again."""
    assert stage.postgres is not None
    await stage.batch_running(tenant)
    return await server_outage(stage.postgres, stage.outage_s["postgres"], f"PostgreSQL on port {stage.postgres.port}")


async def redis_down(stage: Stage, tenant: str) -> Fault:
    """The rate limiter's Redis stopped, then started again on the same port (empty)."""
    assert stage.redis is not None
    return await server_outage(stage.redis, stage.outage_s["redis"], f"redis-server on port {stage.redis.port}")


async def server_outage(server: PrivatePostgres | PrivateRedis, seconds: float, what: str) -> Fault:
    """``server`` stopped for ``seconds``, then started again (also when the drill is cancelled)."""
    started = time.time()
    await asyncio.to_thread(server.stop)
    try:
        await asyncio.sleep(seconds)
    finally:
        await asyncio.to_thread(server.start)
    return Fault(started, time.time(), {"stopped": what, "seconds": seconds})


@dataclass(frozen=True)
class Drill:
    name: str
    #: ``embedded``: the embedded default; ``services``: PostgreSQL and Redis of its own.
    profile: str
    fault: str
    inject: Callable[[Stage, str], Awaitable[Fault]]
    #: How long after the fault ends everything may take to be terminal and notified.
    drain_s: float
    #: What recovery is measured on: the first image done, or the first webhook acknowledged.
    recovery_signal: str = "image"


DRILLS = {
    d.name: d
    for d in (
        Drill("engine-kill", "embedded", "engine replica SIGKILLed mid-batch", engine_kill, 120),
        # A running job's lease (scheduler.lease_s, 60 s) must lapse before the new scheduler takes it.
        Drill("scheduler-kill", "embedded", "scheduler replica SIGKILLed mid-batch", scheduler_kill, 180),
        Drill("s3-down", "embedded", "embedded S3 frozen (SIGSTOP) for {s3:.0f} s", s3_down, 150),
        Drill(
            "webhook-down",
            "embedded",
            "receiver 503 {webhook_down:.0f} s, hangs {webhook_hang:.0f} s, slow {webhook_slow:.0f} s",
            webhook_down,
            150,
            recovery_signal="webhook",
        ),
        Drill("platform-kill", "embedded", "`serve` SIGKILLed mid-batch, restarted", platform_kill, 180),
        Drill("postgres-restart", "services", "PostgreSQL stopped {postgres:.0f} s, restarted", postgres_restart, 150),
        Drill("redis-down", "services", "Redis (rate limits) down {redis:.0f} s, restarted", redis_down, 120),
    )
}


# -- one drill ----------------------------------------------------------------------------------


@dataclass
class DrillResult:
    name: str
    fault: str
    started_at: float
    fault_record: Fault | None = None
    load: dict[str, Any] = field(default_factory=dict)
    invariants: list[Invariant] = field(default_factory=list)
    recovery_s: float | None = None
    drain_s: float | None = None
    jobs_in_flight: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def verdict(self) -> str:
        if self.error:
            return "ERROR"
        if not self.invariants:
            return "NOT RUN"
        return "PASS" if all(i.ok for i in self.invariants) else "FAIL"

    def value(self, name: str) -> str:
        found = [i for i in self.invariants if i.name == name]
        return f"{found[0].value}{'' if found[0].ok else ' ✗'}" if found else "–"

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"verdict": self.verdict}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DrillResult:
        fault = Fault(**data["fault_record"]) if data.get("fault_record") else None
        invariants = [Invariant(**i) for i in data.get("invariants", [])]
        plain = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**plain | {"fault_record": fault, "invariants": invariants})


async def wait_drained(stage: Stage, tenant: str, load: Load, pending: set[asyncio.Task], until: float) -> bool:
    """Every job of ``tenant`` terminal, its terminal webhook acknowledged, no sync request
    waiting; False if ``until`` (monotonic) passed first."""
    while time.monotonic() < until:
        try:
            jobs = await asyncio.to_thread(read_jobs, stage.engine, tenant)
        except Exception:  # the database may still be restarting
            jobs = None
        if jobs is not None and not any(t for t in pending if not t.done()):
            acked = {(a.job_id, a.type) for a in stage.receiver.acks}
            unknown = set(load.accepted) - set(jobs)
            open_ = [j for j, s in jobs.items() if s.status not in TERMINAL]
            owed = [
                j for j, s in jobs.items() if s.webhook and s.status in TERMINAL and (j, f"job.{s.status}") not in acked
            ]
            if not (unknown or open_ or owed):
                return True
        await asyncio.sleep(1.0)
    return False


def recovery(
    obs_done_at: list[float], acks: list[Ack], jobs: dict[str, JobState], fault: Fault, signal_: str
) -> tuple[float | None, float | None]:
    """Seconds from the fault's end to the first image done (or webhook acknowledged) after it,
    and to the last job finished or terminal webhook acknowledged (None while anything is open)."""
    terminal_acks = [a.at for a in acks if a.type.removeprefix("job.") in TERMINAL]
    marks = terminal_acks if signal_ == "webhook" else obs_done_at
    after = [t - fault.ended_at for t in marks if t >= fault.ended_at]
    first = min(after) if after else None
    if any(s.status not in TERMINAL for s in jobs.values()):
        return first, None
    ends = [s.finished_at for s in jobs.values() if s.finished_at] + terminal_acks
    return first, max(0.0, max(ends) - fault.ended_at) if ends else None


async def run_drill(drill: Drill, stage: Stage, options: Options) -> DrillResult:
    import httpx

    tenant = f"drill-{drill.name}"
    started = datetime.now(UTC)
    result = DrillResult(drill.name, drill.fault.format(**stage.outage_s), started.timestamp())
    load, stop = Load(), asyncio.Event()
    log(f"[{drill.name}] load on; fault in {options.warmup_s:.0f} s")
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=SYNC_TIMEOUT_S)) as http:
        generator = asyncio.ensure_future(
            steady_load(
                http,
                stage.platform.url,
                stage.keys[tenant],
                f"{stage.receiver.url}/{tenant}",
                load,
                stop,
                size=options.size,
                jobs_per_s=options.jobs_per_s,
                sync_every_s=options.sync_every_s,
            )
        )
        try:
            await asyncio.sleep(options.warmup_s)
            fault = await drill.inject(stage, tenant)
            result.fault_record = fault
            log(f"[{drill.name}] fault over after {fault.ended_at - fault.started_at:.1f} s: {fault.notes}")
            await asyncio.sleep(options.after_s)
        finally:
            stop.set()
            pending = await generator
        until = min(time.monotonic() + drill.drain_s, stage.deadline)
        log(f"[{drill.name}] load off ({load.sent} sent); waiting up to {until - time.monotonic():.0f} s for every job")
        drained = await wait_drained(stage, tenant, load, pending, until)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    obs, done_at = await asyncio.to_thread(observe, stage, tenant, load, started, fault)
    result.load = load.summary() | {"drained": drained}
    result.invariants = check(obs)
    result.recovery_s, result.drain_s = recovery(done_at, obs.acks, obs.jobs, fault, drill.recovery_signal)
    if not drained:  # a terminal webhook never acknowledged (or a job still open): not drained
        result.drain_s = None
    result.jobs_in_flight = {j: in_flight(obs.jobs.get(j), fault) for j in fault.notes.get("jobs_in_flight", [])}
    log(f"[{drill.name}] {result.verdict}")
    return result


def in_flight(job: JobState | None, fault: Fault) -> str:
    """What became of a job whose batch was running when the fault hit (its lease is the
    scheduler's: a retry on another replica under the same lease is not a new attempt)."""
    if job is None:
        return "no job row"
    when = f", {job.finished_at - fault.ended_at:.1f} s after the fault" if job.finished_at else ""
    return f"{job.status}{when}"


def observe(stage: Stage, tenant: str, load: Load, started: datetime, fault: Fault) -> tuple[Observation, list[float]]:
    jobs = read_jobs(stage.engine, tenant)
    images, done_at, ledger = read_images_and_ledger(stage.engine, tenant)
    job_ids = set(jobs)
    obs = Observation(
        accepted=load.accepted,
        jobs=jobs,
        images_done=images,
        ledger=ledger,
        s3_keys=stage.platform.s3_keys(f"tenants/{tenant}/"),
        acks=[a for a in stage.receiver.acks if a.job_id in job_ids],
        audit=stage.platform.audit(tenant, started),
        orphans=fault.notes.get("orphans"),
        refused=dict(load.refused),
    )
    return obs, done_at


# -- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    size: str
    jobs_per_s: float
    sync_every_s: float
    warmup_s: float
    after_s: float


def platform_settings(root: Path, engine: str, base: Path | None) -> dict[str, Any]:
    """The embedded default (or ``base``), turbo only, on ``root``, with the chosen engine."""
    import yaml

    from zimage_platform.config import find_config_file, load_config

    file = find_config_file(base)
    settings: dict[str, Any] = (yaml.safe_load(file.read_text()) or {}) if file else {}
    config = with_engine(load_config(file), engine)
    settings |= {
        "paths": settings.get("paths", {})
        | {
            "data_dir": str(root / "var"),
            "engines_dir": str(root / "no-overrides"),
            "engine_build_dir": str(REPO / "engines" / "build"),
        },
        "engine": config.engine.model_dump(mode="json"),
        "variants": {VARIANT: config.variant(VARIANT).model_dump(mode="json")},
        "tenancy": settings.get("tenancy", {}) | {"dirs": [str(root / "tenants")]},
    }
    return settings


@contextlib.contextmanager
def staged(
    profile: str, drills: list[Drill], root: Path, settings: dict[str, Any], deadline: float, outage_s: dict[str, float]
) -> Iterator[Stage]:
    """The platform for ``profile`` with a tenant per drill, a webhook receiver, and for
    ``services`` a private PostgreSQL and Redis; everything stopped afterwards."""
    from zimage_platform.db import create_db_engine

    with contextlib.ExitStack() as stack:
        postgres = redis = None
        if profile == "services":
            log("starting a private PostgreSQL and Redis …")
            postgres = stack.enter_context(PrivatePostgres())
            redis = stack.enter_context(PrivateRedis())
            settings = settings | {
                "database": {"url": postgres.create_database("zimage")},
                "tenancy": settings["tenancy"] | {"rate_limit_backend": "redis", "redis_url": redis.url},
            }
        receiver = WebhookReceiver().start()
        stack.callback(receiver.stop)
        platform = ServedPlatform(root, settings, free_port())
        keys = {f"drill-{d.name}": add_tenant(platform.config, f"drill-{d.name}", limits=BENCH_LIMITS) for d in drills}
        stack.callback(platform.stop)
        log(f"starting `zimage-platform serve` ({profile}) …")
        log(f"ready after {platform.start(max(60.0, deadline - time.monotonic())):.0f} s at {platform.url}")
        engine = create_db_engine(platform.config.database_url)
        stack.callback(engine.dispose)
        yield Stage(platform, receiver, engine, keys, deadline, postgres, redis, outage_s)


def run_drills(
    names: list[str],
    options: Options,
    settings_for: Callable[[Path], dict[str, Any]],
    max_s: float,
    outage_s: dict[str, float],
    keep: bool,
) -> list[DrillResult]:
    import shutil
    import tempfile

    deadline = time.monotonic() + max_s
    root = Path(tempfile.mkdtemp(prefix="zimage-drills-"))
    results: list[DrillResult] = []
    try:
        for profile in ("embedded", "services"):
            drills = [DRILLS[n] for n in names if DRILLS[n].profile == profile]
            if not drills:
                continue
            try:
                with staged(profile, drills, root / profile, settings_for(root / profile), deadline, outage_s) as stage:
                    for drill in drills:
                        results.append(asyncio.run(_one(drill, stage, options, deadline)))
            except Exception as exc:  # the platform did not start: its drills did not run
                log(f"{profile}: {type(exc).__name__}: {exc}")
                done = {r.name for r in results}
                for drill in drills:
                    if drill.name not in done:
                        results.append(
                            DrillResult(
                                drill.name, drill.fault, time.time(), error=f"{type(exc).__name__}: {exc}"[:2000]
                            )
                        )
    finally:
        if keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return results


async def _one(drill: Drill, stage: Stage, options: Options, deadline: float) -> DrillResult:
    needed = options.warmup_s + options.after_s + 30
    if deadline - time.monotonic() < needed:
        log(f"[{drill.name}] skipped: the time bound leaves {deadline - time.monotonic():.0f} s")
        return DrillResult(drill.name, drill.fault, time.time(), error="not run: the time bound (--max-minutes) was up")
    try:
        return await run_drill(drill, stage, options)
    except Exception as exc:
        log(f"[{drill.name}] {type(exc).__name__}: {exc}")
        return DrillResult(drill.name, drill.fault, time.time(), error=f"{type(exc).__name__}: {exc}"[:2000])


# -- the report ---------------------------------------------------------------------------------


def markdown(data: dict[str, Any]) -> str:
    results = [DrillResult.from_json(r) for r in data["drills"]]
    meta = data["meta"]
    headers = [
        "drill",
        "fault",
        "accepted (async+sync)",
        "lost",
        "stuck",
        "double-billed",
        "ledger / S3 / delivered",
        "terminal webhooks",
        "audit findings",
        "unexplained 5xx",
        "recovery",
        "drain",
        "client errors",
        "verdict",
    ]
    rows = []
    for r in results:
        refused = sum((r.load.get("refused") or {}).values())
        accepted = f"{r.load.get('accepted_async', 0)}+{r.load.get('accepted_sync', 0)}" if r.load else "–"
        rows.append(
            [
                r.name,
                r.fault,
                accepted,
                r.value("lost"),
                r.value("stuck"),
                r.value("double_billed"),
                r.value("ledger=s3=delivered"),
                r.value("webhooks"),
                r.value("audit"),
                r.value("unexplained_5xx"),
                fmt_num(r.recovery_s, ".1f", " s"),
                fmt_num(r.drain_s if r.load.get("drained", True) else None, ".1f", " s"),
                f"{refused}/{r.load.get('sent', 0)}" if r.load else "–",
                f"**{r.verdict}**",
            ]
        )
    out = [
        f"Fault drills — {meta['date']}, `{meta['command']}`, source {meta['source']}",
        f"Engine: {engine_description(meta['engine'])}; load: {meta['load']}.",
        "",
        markdown_table(headers, rows),
        "",
        "Recovery: from the fault's end (a kill's instant) to the first image done after it (webhook-down: the "
        "first terminal webhook acknowledged); drain: to the last job finished or terminal webhook acknowledged.",
        "",
    ]
    for r in results:
        out.append(f"- **{r.name}** ({r.verdict}): {r.fault}.")
        if r.error:
            out.append(f"  - error: {r.error.splitlines()[0][:300]}")
        if r.fault_record:
            notes = {k: v for k, v in r.fault_record.notes.items() if k != "jobs_in_flight"}
            out.append(f"  - fault: {json.dumps(notes, default=str)}")
        if r.jobs_in_flight:
            shown = ", ".join(f"{j} {s}" for j, s in list(r.jobs_in_flight.items())[:4])
            out.append(f"  - jobs in flight at the fault: {shown}")
        if r.load.get("refused"):
            out.append(f"  - refused or failed requests: {json.dumps(r.load['refused'])}")
        for inv in r.invariants:
            if not inv.ok:
                out.append(f"  - FAILED {inv.name} = {inv.value}: {'; '.join(inv.detail[:6])}")
    return "\n".join(out)


def main(
    only: Annotated[
        str | None, typer.Option(help=f"Comma-separated drills to run (default: all): {', '.join(DRILLS)}.")
    ] = None,
    engine: EngineChoice = "simulated",
    config_path: Annotated[
        Path | None, typer.Option("--config", help="Base platform config YAML (default: the embedded default).")
    ] = None,
    max_minutes: Annotated[float, typer.Option(min=1, help="Bound on the whole run; drills past it are not run.")] = 15,
    size: Annotated[str, typer.Option(help="Image size of every request.")] = "512x512",
    jobs_per_s: Annotated[float, typer.Option(min=0.05, help="Async job submissions per second.")] = 0.5,
    sync_every_s: Annotated[float, typer.Option(min=0.5, help="Seconds between synchronous requests.")] = 5.0,
    warmup_s: Annotated[float, typer.Option(min=0, help="Load before the fault.")] = 6.0,
    after_s: Annotated[float, typer.Option(min=0, help="Load after the fault ends.")] = 8.0,
    s3_down_s: Annotated[float, typer.Option(min=1)] = 30.0,
    postgres_down_s: Annotated[float, typer.Option(min=1)] = 10.0,
    redis_down_s: Annotated[float, typer.Option(min=1)] = 20.0,
    webhook_down_s: Annotated[float, typer.Option(min=0, help="Receiver answers 503 this long, …")] = 12.0,
    webhook_hang_s: Annotated[float, typer.Option(min=0, help="… then hangs this long, …")] = 12.0,
    webhook_slow_s: Annotated[float, typer.Option(min=0, help="… then answers after 3 s this long.")] = 8.0,
    json_out: JsonOut = DEFAULT_JSON,
    render: Render = None,
    keep: Annotated[bool, typer.Option(help="Keep the platforms' folders (logs, databases).")] = False,
) -> None:
    """Fault drills under steady load (engine/scheduler/platform kill, S3, PostgreSQL, Redis and
    webhook outages): nothing accepted lost, nothing billed twice, ledger = S3 = delivered."""
    if render is not None:
        print(markdown(read_json(render)))
        return
    names = [n.strip() for n in (only or ",".join(DRILLS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        raise typer.BadParameter(f"{', '.join(unknown)}: choose from {', '.join(DRILLS)}", param_hint="--only")
    with_engine(_base_config(config_path), engine)  # a bad --engine stops here, before anything starts
    options = Options(size, jobs_per_s, sync_every_s, warmup_s, after_s)
    outage_s = {
        "s3": s3_down_s,
        "postgres": postgres_down_s,
        "redis": redis_down_s,
        "webhook_down": webhook_down_s,
        "webhook_hang": webhook_hang_s,
        "webhook_slow": webhook_slow_s,
    }
    settings_for = lambda root: platform_settings(root, engine, config_path)  # noqa: E731
    meta = run_meta(
        sys.argv[1:],
        engine=engine_meta(with_engine(_base_config(config_path), engine)),
        load=f"{jobs_per_s:g} async jobs/s (1–2 images, webhook) + 1 sync request every {sync_every_s:g} s, {size}",
        options=asdict(options) | {"outages_s": outage_s},
    )
    results = run_drills(names, options, settings_for, max_minutes * 60, outage_s, keep)
    data = {"meta": meta, "drills": [r.to_json() for r in results]}
    write_json(json_out, data)
    print(markdown(data))
    if any(r.verdict != "PASS" for r in results):
        raise typer.Exit(1)


def _base_config(path: Path | None) -> PlatformConfig:
    from zimage_platform.config import load_config

    return load_config(path)
