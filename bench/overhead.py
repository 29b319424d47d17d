"""Overhead benchmark: what the full platform path adds to one request over a bare Ray Serve app.

How it measures, and why:

* Three Serve applications on one local Ray cluster, all serving the same engine (``turbo``,
  same backend, tiny checkpoint):
  - ``bare``: a FastAPI ingress deployment → deployment handle → an engine deployment holding a
    ``PipelineEngine``, which returns the PNG bytes. No auth, no S3, no database, no scheduler.
    Its code is here (benchmark code, not product code).
  - ``platform``: ``build_app`` with the default merge wait, SQLite and the embedded S3, called
    with ``POST /v1/images/generations`` as an OpenAI client would (``response_format`` ``url``,
    and ``b64_json``, where the ingress also reads the PNG back from S3).
  - ``nowait``: the same platform with ``max_wait_ms`` 0, to show what the merge wait costs a
    lone request.
* One client, sequential requests, every prompt new (the text encoder always runs), in blocks:
  each round runs a block on every contender, the order rotating, after waiting for other
  processes to quieten. Medians and p95 over all requests.
* Where the platform's time goes: the job's own timestamps (written by the scheduler) split each
  request's wall time into hops; the engine's time is the runner's ``engine_s``. Then the
  benchmark times the platform's DB and S3 calls directly (in this process, against a scratch
  database and the same S3), so each hop's cost can be set against what it adds.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import (
    BENCH_LIMITS,
    BENCH_TENANT,
    PROMPT,
    VARIANT,
    BenchCluster,
    ConfigPath,
    CpuSnapshot,
    EngineChoice,
    HttpSample,
    JobTimes,
    JsonOut,
    MaxNoise,
    QuietWait,
    Render,
    Target,
    add_tenant,
    attach_job_times,
    engine_description,
    engine_meta,
    fmt_num,
    generation_body,
    log,
    machine_line,
    markdown_table,
    parse_sizes,
    percentile,
    read_json,
    report_heading,
    rotated,
    run_meta,
    simulated_latency,
    targets_section,
    timed_post,
    wait_all_ready,
    wait_for_others_quiet,
    wall_time,
    with_engine,
    write_json,
)

if TYPE_CHECKING:
    import httpx
    from ray.serve import Application

    from zimage_platform.config import PlatformConfig

BARE, PLATFORM, NOWAIT = "bare", "platform", "nowait"
TARGET_SIZE = "64x64"
#: The platform may add at most this share of the bare app's p50 at TARGET_SIZE.
TARGET_ADDED_PCT = 25.0
#: On the simulated engine: the platform's 1-client p50 may exceed its engine time by at most this.
SIMULATED_ADDED_MS = 15.0
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Contender:
    label: str
    app: str
    #: The images API's ``response_format``; ``None`` for the bare app.
    response_format: str | None = None


CONTENDERS = (
    Contender(BARE, BARE),
    Contender(PLATFORM, PLATFORM, "url"),
    Contender("platform b64_json", PLATFORM, "b64_json"),
    Contender("platform, no merge wait", NOWAIT, "url"),
)
#: The contender the target is judged on: the images API as an OpenAI client calls it by default.
TARGET_CONTENDER = PLATFORM


# -- the bare app -------------------------------------------------------------------------------


def bare_app(config: PlatformConfig) -> Application:
    """FastAPI ingress → handle → engine deployment with the platform's engine
    (``create_engine``: the config's backend, or the simulated engine); PNG out.

    Built inside a function so that importing this module (every ``python -m bench`` run, and the
    engine benchmark's spawned workers) does not import Ray or FastAPI; Ray pickles the classes
    by value. The engine side mirrors the platform's ``Engine`` deployment on a CPU pool: same
    replica resources and precision, load and warm-up, ``engine.run`` in a worker thread, timed
    the same way.
    """
    from fastapi import FastAPI
    from fastapi.responses import Response
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    from zimage_platform.serve.builder import absolute_paths

    data = absolute_paths(config).model_dump(mode="json")
    pool_name = next(iter(config.pools))
    pool = config.pools[pool_name]
    api = FastAPI()

    class BareEngine:
        async def __init__(self, config_data: dict[str, Any], variant: str, pool: str) -> None:
            from zimage_platform.config import PlatformConfig
            from zimage_platform.engines import create_engine

            self.config = PlatformConfig.model_validate(config_data)
            self.engine = create_engine(self.config, variant, pool)
            await asyncio.to_thread(self.engine.load)
            await asyncio.to_thread(self.engine.warmup, [self.engine.spec.defaults.size])

        async def generate(self, prompt: str, size: str, seed: int, steps: int) -> tuple[bytes, float]:
            """The PNG and the seconds inside ``engine.run`` (the platform runner's ``engine_s``)."""
            from zimage_platform.pipeline.params import GenerationParams, resolve_requests

            spec, buckets = self.engine.spec, self.config.buckets_for(self.engine.variant)
            (request,) = resolve_requests(
                GenerationParams(prompt=prompt, size=size, seed=seed, steps=steps), spec, buckets
            )
            start = time.perf_counter()
            (result,) = await asyncio.to_thread(self.engine.run, [request])
            assert result.png is not None
            return result.png, time.perf_counter() - start

        def ping(self) -> bool:
            return True

    @serve.ingress(api)
    class BareIngress:
        def __init__(self, engine: DeploymentHandle) -> None:
            self.engine = engine

        # Annotations here may name builtins only: Ray pickles these classes by value and FastAPI
        # evaluates the (string) annotations again on the replica, where this module's imports
        # are absent; an unresolved one silently turns the JSON body into a query parameter.
        @api.post("/generate", response_model=None)
        async def generate(self, body: dict):
            png, engine_s = await self.engine.generate.remote(body["prompt"], body["size"], body["seed"], body["steps"])
            return Response(png, media_type="image/png", headers={"x-engine-s": f"{engine_s:.6f}"})

        @api.get("/readyz")
        async def readyz(self) -> dict[str, str]:
            await self.engine.ping.remote()
            return {"status": "ready"}

    engine = (
        serve.deployment(BareEngine)
        .options(
            name="BareEngine",
            ray_actor_options={"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus},
            max_ongoing_requests=pool.max_concurrent_batches,
        )
        .bind(data, VARIANT, pool_name)
    )
    return serve.deployment(BareIngress).options(name="BareIngress", ray_actor_options={"num_cpus": 0}).bind(engine)


# -- requests -----------------------------------------------------------------------------------


async def one_request(
    http: httpx.AsyncClient, url: str, key: str, contender: Contender, size: str, round_: int, seq: int
) -> tuple[HttpSample, bytes]:
    """One request of ``contender``; the sample and the response body (the PNG, for the bare app)."""
    tag = f"{contender.label} {size} round {round_} #{seq}"
    body = generation_body(tag, size, seed=seq, response_format=contender.response_format or "url")
    if contender.response_format is None:
        body = {k: body[k] for k in ("prompt", "size", "seed", "steps")}
        target, headers = f"{url}/generate", {}
    else:
        target, headers = f"{url}/v1/images/generations", {"Authorization": f"Bearer {key}"}
    response, sent_at, latency = await timed_post(http, target, body, headers)
    status = response.status_code if response is not None else 0
    sample = HttpSample(contender.label, size, round_, 1, sent_at, latency, status)
    if response is not None and status == 200:
        if contender.response_format is None:
            sample.engine_s = float(response.headers["x-engine-s"])
        else:
            sample.job_id = response.json()["job_id"]
    return sample, response.content if response is not None else b""


async def measure(
    urls: dict[str, str],
    key: str,
    sizes: list[str],
    *,
    rounds: int,
    block: int,
    warmup: int,
    max_noise: float,
    quiet_wait: float,
) -> tuple[list[HttpSample], dict[str, bytes], float]:
    """Warm every contender up, then run the alternated blocks; ``(samples, a PNG per size, s waited)``."""
    import httpx

    samples: list[HttpSample] = []
    pngs: dict[str, bytes] = {}
    waited = 0.0
    seq = 0
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
        for size in sizes:
            for contender in CONTENDERS:
                for _ in range(warmup):
                    sample, content = await one_request(http, urls[contender.app], key, contender, size, -1, seq)
                    seq += 1
                    if contender.app == BARE and sample.status == 200:
                        pngs[size] = content
        for round_ in range(rounds):
            for index, size in enumerate(sizes):
                for contender in rotated(CONTENDERS, round_ * len(sizes) + index):
                    waited += await asyncio.to_thread(wait_for_others_quiet, max_noise, quiet_wait)
                    before, got = CpuSnapshot.take(), []
                    for _ in range(block):
                        sample, _ = await one_request(http, urls[contender.app], key, contender, size, round_, seq)
                        got.append(sample)
                        seq += 1
                    others = before.others_share(CpuSnapshot.take())
                    for sample in got:
                        sample.others = others
                    samples += got
            log(f"round {round_ + 1}/{rounds} done")
    return samples, pngs, waited


# -- direct timings of the platform's DB and S3 calls -------------------------------------------

#: Calls of each kind on one images request with one image (read from the code: ingress in
#: api/images/serving.py and api/generation.py, scheduler in scheduling/service.py, engine
#: replica in serve/runner.py). ``JobStore.create``, ``claim`` and ``finish`` each end with a
#: ``get`` of their own, included in their timings.
HOP_CALLS: dict[str, tuple[str, int]] = {
    "auth": ("TenantRegistry.authenticate (ingress)", 1),
    "admission": ("rate limits (memory) + content policy on prompt and negative prompt (ingress)", 1),
    "create": ("JobStore.create, insert + read back (scheduler)", 1),
    "get": ("JobStore.get (ingress after submit and after wait; scheduler wait)", 3),
    "claim": ("JobStore.claim (scheduler)", 1),
    "put_image": ("ResultStore.put_image, HEAD + PUT (engine replica)", 1),
    "record_image": ("JobStore.record_image with its hash-chained ledger row (scheduler)", 1),
    "finish": ("JobStore.finish (scheduler)", 1),
    "presign": ("ResultStore.presign_get (ingress, url)", 1),
    "get_bytes": ("ResultStore.get_bytes (ingress, b64_json only)", 1),
}


def measure_hops(
    cluster: BenchCluster, config: PlatformConfig, key: str, png: bytes, count: int
) -> dict[str, list[float]]:
    """Seconds per call of each DB/S3/auth step of the platform path, called directly ``count`` times.

    A scratch database (same schema, same SQLite settings) keeps the apps' job rows untouched.
    """
    from zimage_platform.billing.ledger import LedgerEntry
    from zimage_platform.db import utcnow
    from zimage_platform.scheduling.store import NewJob, StoredImage
    from zimage_platform.serve.components import (
        job_store,
        policy_registry,
        rate_limiter,
        result_store,
        tenant_registry,
    )

    scratch = config.model_copy(
        update={"database": config.database.model_copy(update={"url": f"sqlite:///{cluster.root / 'hops.db'}"})}
    )
    store, results, tenants = job_store(scratch, migrate=True), result_store(config), tenant_registry(config)
    limiter, policies = rate_limiter(config), policy_registry(config)
    timings: dict[str, list[float]] = {name: [] for name in HOP_CALLS}

    @contextmanager
    def timed(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        timings[name].append(time.perf_counter() - start)

    for i in range(count):
        with timed("auth"):
            tenant = tenants.authenticate(key)
        prompt = f"{PROMPT} (hop timing #{i})"
        with timed("admission"):
            limiter.check_request(tenant.id, tenant.limits.requests_per_minute)
            limiter.check_images(tenant.id, tenant.limits.images_per_minute, 1)
            policy = policies.for_tenant(tenant.id, tenant.policy)
            policy.match(prompt)
            policy.match("")
        job = NewJob(
            tenant_id=tenant.id,
            variant=VARIANT,
            kind="text2img",
            params={"prompt": prompt, "size": "64x64", "steps": 8, "guidance": 0.0},
            seeds=[i],
            source="openai",
        )
        with timed("create"):
            row, _ = store.create(job)
        with timed("get"):
            store.get(job.id, tenant.id)
        with timed("claim"):
            store.claim(job.id, "bench-hops", 60.0)
        object_key = results.image_key(tenant.id, job.id, 0, utcnow())
        with timed("put_image"):
            stored = results.put_image(object_key, png, {"job-id": job.id})
        image = StoredImage(stored.key, stored.sha256 or "", stored.size, [], 1, 0.03)
        bill = LedgerEntry(
            tenant_id=tenant.id,
            job_id=job.id,
            image_index=0,
            plan=row.plan,
            variant=VARIANT,
            bucket="64x64",
            steps=8,
            backend=config.engine.backend,
            pool=next(iter(config.pools)),
            mig_profile=None,
            batch_size=1,
            gpu_seconds=0.03,
            s3_key=stored.key,
            sha256=stored.sha256 or "",
            size_bytes=stored.size,
            trace_id=None,
            job_created_at=row.created_at,
            delivered_at=utcnow(),
            etag=stored.etag,
        )
        with timed("record_image"):
            store.record_image(job.id, 0, image, bill)
        with timed("finish"):
            store.finish(job.id, "succeeded")
        with timed("presign"):
            results.presign_get(object_key)
        with timed("get_bytes"):
            results.get_bytes(object_key)
    store.engine.dispose()
    return timings


# -- the report ---------------------------------------------------------------------------------

#: Hops of a platform request, from the client's clock and the job's timestamps (one machine, one
#: clock). Each takes ``(sample, job)`` and returns seconds.
SEGMENTS: tuple[tuple[str, Callable[[HttpSample, JobTimes], float | None]], ...] = (
    ("A", lambda s, j: j.created_at - s.sent_at),
    ("B", lambda s, j: _minus(j.started_at, j.created_at)),
    ("C", lambda s, j: j.engine_s),
    ("D", lambda s, j: None if j.engine_s is None else _minus(j.image_done_at, j.started_at, j.engine_s)),
    ("E", lambda s, j: _minus(j.finished_at, j.image_done_at)),
    ("F", lambda s, j: _minus(s.sent_at + s.latency_s, j.finished_at)),
)
#: Column headers of SEGMENTS, and what each one covers.
SEGMENT_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "A →job row",
        "client → job row written: Serve proxy, ingress, auth, rate limit, policy, validation, "
        "handle call to the scheduler, INSERT",
    ),
    ("B →claimed", "job row → job claimed: queue, merge wait (`max_wait_ms`), claim UPDATE"),
    ("C engine.run", "the runner's `engine_s`: `engine.run` in the engine replica"),
    (
        "D stream+S3+DB",
        "claimed → image recorded, less C: scheduler → engine handle (streamed progress), "
        "S3 HEAD + PUT, result back, image UPDATE",
    ),
    ("E →finished", "image recorded → job finished: job UPDATE"),
    (
        "F →client",
        "job finished → response at the client: event to the waiting ingress, job read, "
        "presign (url) or S3 GET + base64 (b64_json), Serve proxy",
    ),
)


def _minus(first: float | None, *others: float | None) -> float | None:
    if first is None or any(o is None for o in others):
        return None
    return first - sum(o for o in others if o is not None)


def _ms(value: float | None) -> str:
    return fmt_num(None if value is None else value * 1000, ".1f")


@dataclass
class Report:
    """One run's samples and hop timings; built the same way for a fresh run and a saved one (``--render``)."""

    meta: dict[str, Any]
    samples: list[HttpSample]
    hops: dict[str, list[float]]

    def ok(self, label: str, size: str) -> list[HttpSample]:
        """Successful requests from clean blocks (other processes under ``max_noise``); all when none was clean."""
        done = [s for s in self.samples if (s.label, s.size) == (label, size) and s.status == 200]
        clean = [s for s in done if s.others is not None and s.others <= self.meta["max_noise"]]
        return clean or done

    def clean_of(self, label: str, size: str) -> str:
        mine = [s for s in self.samples if (s.label, s.size) == (label, size)]
        clean = [s for s in mine if s.others is not None and s.others <= self.meta["max_noise"]]
        return f"{len(clean)}/{len(mine)}"

    def latency(self, label: str, size: str, q: float) -> float | None:
        return percentile([s.latency_s for s in self.ok(label, size)], q)

    def added(self, label: str, size: str) -> tuple[float | None, float | None]:
        """p50 added over the bare app's p50: ``(seconds, percent of bare)``."""
        mine, bare = self.latency(label, size, 50), self.latency(BARE, size, 50)
        if mine is None or not bare:
            return None, None
        return mine - bare, (mine - bare) / bare * 100

    def segment(self, label: str, size: str, value: Callable[[HttpSample, JobTimes], float | None]) -> float | None:
        values = [v for s in self.ok(label, size) if s.job is not None and (v := value(s, s.job)) is not None]
        return statistics.median(values) if values else None

    def bare_engine(self, size: str) -> float | None:
        values = [s.engine_s for s in self.ok(BARE, size) if s.engine_s is not None]
        return statistics.median(values) if values else None

    def targets(self) -> list[Target]:
        targets = []
        for contender in CONTENDERS[1:]:
            for size in self.meta["sizes"]:
                judged = contender.label == TARGET_CONTENDER and size == TARGET_SIZE
                targets.append(
                    Target(
                        f"{contender.label} p50 added over bare at {size}",
                        self.added(contender.label, size)[1],
                        TARGET_ADDED_PCT if judged else None,
                        op="≤",
                        unit="%",
                    )
                )
        if self.meta.get("backend") == "simulated":
            targets += self.simulated_targets()
        return targets

    def simulated_targets(self) -> list[Target]:
        """On the simulated engine the engine's time is known and costs no CPU: the platform's
        1-client p50 over its own ``engine.run`` p50 is all path (HTTP, scheduler, rows, S3)."""
        targets = []
        for size in self.meta["sizes"]:
            wall, engine = (
                self.latency(TARGET_CONTENDER, size, 50),
                self.segment(TARGET_CONTENDER, size, dict(SEGMENTS)["C"]),
            )
            model_ms = self.meta["simulated"]["batch_ms"].get(size)
            targets.append(
                Target(
                    f"{TARGET_CONTENDER} 1-client p50 − its engine.run p50 at {size} (simulated engine; "
                    f"the model's batch of 1: {fmt_num(model_ms, '.0f')} ms)",
                    None if wall is None or engine is None else (wall - engine) * 1000,
                    SIMULATED_ADDED_MS if size == TARGET_SIZE else None,
                    op="≤",
                    unit=" ms",
                )
            )
        return targets

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        samples = [HttpSample.from_dict(s) for s in data["samples"]]
        return cls(meta=data["meta"], samples=samples, hops=data["hops"])

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "targets": [t.to_dict() for t in self.targets()],
            "hops": self.hops,
            "samples": [asdict(s) for s in self.samples],
        }

    def markdown(self) -> str:
        m = self.meta
        sizes = m["sizes"]
        latency_rows = []
        for size in sizes:
            for contender in CONTENDERS:
                added_s, added_pct = self.added(contender.label, size)
                n_all = sum(1 for s in self.samples if (s.label, s.size) == (contender.label, size))
                latency_rows.append(
                    [
                        contender.label,
                        size,
                        _ms(self.latency(contender.label, size, 50)),
                        _ms(self.latency(contender.label, size, 95)),
                        "—" if contender.app == BARE else _ms(added_s),
                        "—" if contender.app == BARE else fmt_num(added_pct, ".0f", "%"),
                        f"{sum(s.status == 200 for s in self.samples if (s.label, s.size) == (contender.label, size))}"
                        f"/{n_all}",
                        self.clean_of(contender.label, size),
                    ]
                )
        platform_labels = [c.label for c in CONTENDERS if c.app != BARE]
        bare_rows = [
            [
                size,
                _ms(self.latency(BARE, size, 50)),
                _ms(self.bare_engine(size)),
                _ms(_minus(self.latency(BARE, size, 50), self.bare_engine(size))),
            ]
            for size in sizes
        ]
        segment_rows = [
            [
                label,
                size,
                _ms(self.latency(label, size, 50)),
                *(_ms(self.segment(label, size, fn)) for _, fn in SEGMENTS),
            ]
            for size in sizes
            for label in platform_labels
        ]
        hop_rows = []
        for name, (what, calls) in HOP_CALLS.items():
            values = self.hops.get(name, [])
            median = statistics.median(values) if values else None
            hop_rows.append(
                [
                    what,
                    _ms(median),
                    _ms(percentile(values, 95)),
                    str(calls),
                    _ms(None if median is None else median * calls),
                ]
            )
        return "\n".join(
            [
                *report_heading("Overhead benchmark", m),
                f"{machine_line(m)}. Variant `{VARIANT}` only, {engine_description(m)}, 8 steps, one client, "
                f"sequential; {m['warmup']} warm-up requests per contender and size, then {m['rounds']} rounds of "
                f"{m['block']} requests per contender and size, contenders rotated; percentiles over the clean "
                f"blocks (other processes under {m['max_noise']:.0%} of the CPU; all blocks when none was). "
                "Platform merge wait "
                f"`max_wait_ms` = {json.dumps(m['max_wait_ms'])} (`nowait`: 0). {wall_time(m)}",
                "",
                markdown_table(
                    ["Contender", "Size", "p50 ms", "p95 ms", "p50 added ms", "p50 added %", "OK", "Clean"],
                    latency_rows,
                ),
                "",
                "Where the time goes (medians, ms). Bare app: its engine replica's time inside "
                "`engine.run`; the rest is Serve's proxy, the ingress, the handle hop and the PNG transfer.",
                "",
                markdown_table(["Size", "Wall p50", "engine.run", "Rest"], bare_rows),
                "",
                "Platform: each request's wall time cut at the job's own timestamps (scheduler clock = client "
                "clock, one machine); the parts' medians need not add up to the wall median.",
                "",
                markdown_table(
                    ["Contender", "Size", "Wall p50", *(short for short, _ in SEGMENT_HEADERS)], segment_rows
                ),
                "",
                *(f"- {short}: {long}" for short, long in SEGMENT_HEADERS),
                "",
                f"Platform DB/S3/auth calls timed directly ({m['hop_count']} times each, in the benchmark's "
                "process, scratch SQLite database, same S3):",
                "",
                markdown_table(["Call", "Median ms", "p95 ms", "Calls per request", "ms per request"], hop_rows),
                "",
                *targets_section(self.targets()),
            ]
        )


# -- the command --------------------------------------------------------------------------------


def run_benchmark(
    base: PlatformConfig,
    sizes: list[str],
    *,
    rounds: int,
    block: int,
    warmup: int,
    hop_count: int,
    max_noise: float,
    quiet_wait: float,
) -> tuple[dict[str, Any], list[HttpSample], dict[str, list[float]]]:
    started = time.perf_counter()
    with BenchCluster(base) as cluster:
        configs = {
            PLATFORM: cluster.platform_config(PLATFORM, f"/{PLATFORM}"),
            NOWAIT: cluster.platform_config(NOWAIT, f"/{NOWAIT}", max_wait_ms={"default": 0.0}),
        }
        key = add_tenant(configs[PLATFORM], BENCH_TENANT, limits=BENCH_LIMITS)
        urls = {name: cluster.deploy_platform(config) for name, config in configs.items()}
        urls[BARE] = cluster.deploy(bare_app(configs[PLATFORM]), BARE, f"/{BARE}")
        log("waiting for the three apps to be ready (engines load and warm up) …")
        wait_all_ready(list(urls.values()))
        samples, pngs, waited = asyncio.run(
            measure(
                urls, key, sizes, rounds=rounds, block=block, warmup=warmup, max_noise=max_noise, quiet_wait=quiet_wait
            )
        )
        for name, config in configs.items():
            labels = {c.label for c in CONTENDERS if c.app == name}
            attach_job_times(config, [s for s in samples if s.label in labels])
        log(f"timing the platform's DB and S3 calls ({hop_count} times each) …")
        png = pngs.get(TARGET_SIZE) or next(iter(pngs.values()))
        hops = measure_hops(cluster, configs[PLATFORM], key, png, hop_count)
        meta = {
            **engine_meta(base),
            "max_wait_ms": next(iter(configs[PLATFORM].pools.values())).max_wait_ms,
            "quiet_wait_s": waited,
        }
    meta["wall_s"] = time.perf_counter() - started
    return meta, samples, hops


def main(
    sizes: Annotated[str, typer.Option(help="Comma-separated buckets.")] = "64x64,128x128",
    rounds: Annotated[int, typer.Option(min=1, help="Rounds; each runs a block per contender and size.")] = 10,
    block: Annotated[int, typer.Option(min=1, help="Sequential requests per contender, size and round.")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="Unmeasured requests per contender and size first.")] = 5,
    hop_count: Annotated[int, typer.Option(min=1, help="Direct timings of each DB/S3 call.")] = 50,
    max_noise: MaxNoise = 0.1,
    quiet_wait: QuietWait = 3.0,
    engine: EngineChoice = "real",
    json_out: JsonOut = None,
    config_path: ConfigPath = None,
    render: Render = None,
) -> None:
    """Platform vs bare Ray Serve app, one client: p50/p95 latency, the p50 the platform adds, and where."""
    if render is not None:
        print(Report.from_json(read_json(render)).markdown())
        return
    from zimage_platform.config import load_config

    base = with_engine(load_config(config_path), engine)
    size_list = parse_sizes(base, sizes, param="--sizes")
    meta = run_meta(sys.argv[1:])
    if base.engine.backend == "simulated":
        latency = simulated_latency(base)
        meta["simulated"] = {"batch_ms": {s: latency.batch_seconds(latency.key(s, 8), 1) * 1000 for s in size_list}}
    measured, samples, hops = run_benchmark(
        base,
        size_list,
        rounds=rounds,
        block=block,
        warmup=warmup,
        hop_count=hop_count,
        max_noise=max_noise,
        quiet_wait=quiet_wait,
    )
    meta |= measured | {
        "sizes": size_list,
        "rounds": rounds,
        "block": block,
        "warmup": warmup,
        "hop_count": hop_count,
        "max_noise": max_noise,
        "load_average_after": os.getloadavg(),
    }
    report = Report(meta, samples, hops)
    print(report.markdown())
    write_json(json_out, report.to_json())
