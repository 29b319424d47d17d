"""Burst benchmark: a realtime tenant's latency while a bulk tenant floods the platform.

How it measures, and why:

* The real platform over HTTP (``build_app`` on a local Ray, SeaweedFS S3, SQLite), with the
  production pool layout ``deploy/config/cpu-pools.yaml``: one pool per priority class, CPU
  replicas standing in for MIG slices, idle pools lending their engines to lower classes. Each
  engine replica gets ``--threads`` intra-op threads, so the realtime replica keeps a core the
  way a MIG slice keeps its compute (on a 2-core machine nothing isolates the ingress, the
  scheduler and the bulk replicas' memory traffic: they still share the cores).
* Capacity is calibrated first: a block of bulk images submitted at once, images/s until the
  last one is done (every pool's engines, borrowing included).
* ``alone``: the realtime tenant sends one synchronous ``POST /v1/images/generations`` every
  ``--interval`` s (open loop: requests do not wait for each other) for ``--alone`` s.
* ``flood``: the same realtime load, while the bulk tenant submits ``POST /v1/jobs`` (``n`` images
  each) at ``--flood-factor`` × capacity for ``--duration`` s. Its rate limit (images/min, set to
  ``--bulk-limit-factor`` × capacity) refuses the excess with 429, which is counted by reason.
* Afterwards every accepted bulk job must reach a terminal state (read from the job database):
  accepted = terminal, nothing lost. Bulk throughput during the flood tells whether bulk kept
  using the capacity realtime left idle.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import (
    BENCH_LIMITS,
    REPO,
    VARIANT,
    BenchCluster,
    EngineChoice,
    JsonOut,
    Render,
    Target,
    add_tenant,
    cpu_by_process,
    engine_description,
    engine_meta,
    fmt_num,
    generation_body,
    log,
    markdown_table,
    percentile,
    ratio,
    read_json,
    run_meta,
    tree_cpu_s,
    wait_all_ready,
    with_engine,
    write_json,
)

if TYPE_CHECKING:
    import httpx

    from zimage_platform.config import PlatformConfig

REALTIME, BULK, CALIBRATION = "rt-burst", "bulk-burst", "calibration"
#: The GPU pool layout the simulated engine's pools emulate, pool by pool.
GPU_LAYOUT = REPO / "deploy" / "config" / "h800-mig.yaml"
P95_RATIO_TARGET = 1.5
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Phase:
    """What the clients saw in one phase."""

    name: str
    seconds: float = 0.0
    realtime_latency_s: list[float] = field(default_factory=list)
    realtime_status: Counter[str] = field(default_factory=Counter)
    bulk_sent: int = 0
    bulk_images_offered: int = 0
    bulk_accepted: list[str] = field(default_factory=list)
    #: ``"429 rate_limited"``, ``"202"``... (status and error code).
    bulk_answers: Counter[str] = field(default_factory=Counter)
    started_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``asdict`` would turn a ``Counter`` into a count of its items)."""
        return {f.name: dict(v) if isinstance(v := getattr(self, f.name), Counter) else v for f in fields(self)}


def platform_config(cluster: BenchCluster, threads: int) -> PlatformConfig:
    """The cpu-pools layout serving turbo only, engines with ``threads`` intra-op threads each; on
    the simulated engine each pool emulates the MIG slice and precision of the GPU layout's pool
    of the same name (``deploy/config/h800-mig.yaml``: realtime 3g.40gb bf16, standard 2g.20gb
    fp8, bulk 1g.20gb fp8)."""
    from zimage_platform.config import load_config

    config = cluster.platform_config("burst", "/")
    gpu = load_config(GPU_LAYOUT) if config.engine.backend == "simulated" else None
    pools = {}
    for name, pool in config.pools.items():
        update: dict[str, Any] = {"variants": [VARIANT]}
        if gpu is not None and name in gpu.pools:
            update |= {"mig_profile": gpu.pools[name].mig_profile, "precision": gpu.precision_in(name, VARIANT)}
        pools[name] = pool.model_copy(update=update)
    return config.model_copy(update={"pools": pools, "engine": config.engine.model_copy(update={"threads": threads})})


def job_statuses(config: PlatformConfig, tenant: str) -> tuple[Counter[str], dict[str, str], list[float]]:
    """Jobs of ``tenant`` by status, status by job id, and when each of its images finished (epoch s)."""
    from sqlalchemy import select

    from zimage_platform.db import create_db_engine, session_factory
    from zimage_platform.scheduling.models import JobImageRow, JobRow

    engine = create_db_engine(config.database_url)
    try:
        with session_factory(engine)() as s:
            by_id = dict(s.execute(select(JobRow.id, JobRow.status).where(JobRow.tenant_id == tenant)).all())
            done = s.scalars(
                select(JobImageRow.finished_at)
                .join(JobRow, JobRow.id == JobImageRow.job_id)
                .where(JobRow.tenant_id == tenant, JobImageRow.status == "done")
            ).all()
    finally:
        engine.dispose()
    return Counter(by_id.values()), by_id, [t.timestamp() for t in done if t is not None]


def realtime_breakdown(config: PlatformConfig, start: float, end: float) -> dict[str, float | None]:
    """p95 of where a realtime job's time went (from its row): queued → started → finished."""
    from sqlalchemy import select

    from zimage_platform.db import create_db_engine, session_factory
    from zimage_platform.scheduling.models import JobRow

    engine = create_db_engine(config.database_url)
    try:
        with session_factory(engine)() as s:
            rows = s.execute(
                select(JobRow.created_at, JobRow.started_at, JobRow.finished_at).where(JobRow.tenant_id == REALTIME)
            ).all()
    finally:
        engine.dispose()
    rows = [(c.timestamp(), a.timestamp(), f.timestamp()) for c, a, f in rows if a and f]
    rows = [(c, a, f) for c, a, f in rows if start <= c <= end]
    return {
        "jobs": len(rows),
        "queued_p95_s": percentile([a - c for c, a, _ in rows], 95),
        "running_p95_s": percentile([f - a for _, a, f in rows], 95),
        "accepted_to_done_p95_s": percentile([f - c for c, _, f in rows], 95),
    }


async def realtime_load(
    http: httpx.AsyncClient, url: str, key: str, size: str, interval: float, seconds: float, phase: Phase
) -> None:
    """One synchronous request every ``interval`` s, each in its own task (open loop)."""

    async def one(i: int) -> None:
        start = time.perf_counter()
        try:
            answer = await http.post(
                f"{url}/v1/images/generations",
                json=generation_body(f"{phase.name} rt {i}", size, i),
                headers={"Authorization": f"Bearer {key}"},
            )
            status = str(answer.status_code)
        except Exception as exc:  # a transport failure is a result here
            status = type(exc).__name__
        phase.realtime_status[status] += 1
        if status == "200":
            phase.realtime_latency_s.append(time.perf_counter() - start)

    tasks, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
    await asyncio.gather(*tasks)


async def bulk_flood(
    http: httpx.AsyncClient,
    url: str,
    key: str,
    size: str,
    jobs_per_s: float,
    n: int,
    seconds: float,
    phase: Phase,
    max_in_flight: int = 64,
) -> None:
    """``jobs_per_s`` async submissions of ``n`` images each, bounded in flight (loopback, bounded time)."""
    gate = asyncio.Semaphore(max_in_flight)

    async def one(i: int) -> None:
        async with gate:
            try:
                answer = await http.post(
                    f"{url}/v1/jobs",
                    json={"prompt": f"catalogue item {i}", "size": size, "n": n, "steps": 8, "seed": i},
                    headers={"Authorization": f"Bearer {key}"},
                )
            except Exception as exc:
                phase.bulk_answers[type(exc).__name__] += 1
                return
        if answer.status_code == 202:
            phase.bulk_accepted.append(answer.json()["id"])
            phase.bulk_answers["202"] += 1
        else:
            try:
                code = answer.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "?"
            phase.bulk_answers[f"{answer.status_code} {code}"] += 1

    tasks, start, i = [], time.perf_counter(), 0
    total = math.ceil(seconds * jobs_per_s)  # by count, not by clock: the offer is never short
    while i < total:
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        phase.bulk_sent += 1
        phase.bulk_images_offered += n
        await asyncio.sleep(max(0.0, start + i / jobs_per_s - time.perf_counter()))
    await asyncio.gather(*tasks)


async def calibrate(
    http: httpx.AsyncClient, url: str, key: str, size: str, config: PlatformConfig, images: int
) -> float:
    """Images/s of the whole platform (every pool, borrowing included) on a block submitted at once."""
    n = 4
    answers = await asyncio.gather(
        *[
            http.post(
                f"{url}/v1/jobs",
                json={"prompt": f"calibration {i}", "size": size, "n": n, "steps": 8, "seed": i},
                headers={"Authorization": f"Bearer {key}"},
            )
            for i in range(images // n)
        ]
    )
    assert all(a.status_code == 202 for a in answers), [a.text for a in answers if a.status_code != 202][:3]
    while True:
        statuses, _, done = job_statuses(config, CALIBRATION)
        if sum(statuses[s] for s in TERMINAL) == len(answers):
            break
        await asyncio.sleep(0.5)
    assert statuses["succeeded"] == len(answers), statuses
    # The steady drain rate: the first fifth (engines warming to full batches) does not count.
    done.sort()
    first = len(done) // 5
    return (len(done) - 1 - first) / (done[-1] - done[first])


async def drain(config: PlatformConfig, accepted: set[str], timeout_s: float) -> tuple[Counter[str], float]:
    """Wait until every accepted bulk job is terminal; returns their statuses and the seconds waited."""
    start = time.perf_counter()
    while True:
        _, by_id, _ = job_statuses(config, BULK)
        open_jobs = [j for j in accepted if by_id.get(j) not in TERMINAL]
        if not open_jobs or time.perf_counter() - start > timeout_s:
            return Counter(by_id.get(j, "missing") for j in accepted), time.perf_counter() - start
        await asyncio.sleep(2.0)


async def run_phases(
    url: str,
    config: PlatformConfig,
    keys: dict[str, str],
    *,
    size: str,
    interval: float,
    alone_s: float,
    flood_s: float,
    flood_factor: float,
    bulk_n: int,
    bulk_limit_factor: float,
    calibration_images: int,
    drain_timeout_s: float,
    capacity: float | None = None,
) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        calibrated = capacity is None
        if capacity is None:
            log("calibrating capacity …")
            capacity = await calibrate(http, url, keys[CALIBRATION], size, config, calibration_images)
        log(f"capacity: {capacity:.2f} images/s ({'calibrated' if calibrated else 'given'})")
        bulk_limit = max(1, int(bulk_limit_factor * capacity * 60))
        keys[BULK] = add_tenant(
            config,
            BULK,
            priority_class="bulk",
            plan="bulk",
            limits={"requests_per_minute": 1_000_000, "images_per_minute": bulk_limit, "concurrent_jobs": 100_000},
        )
        await asyncio.sleep(config.tenancy.reload_s + 1.0)  # the registry picks the new tenant up

        alone = Phase("alone", seconds=alone_s, started_at=time.time())
        log(f"realtime alone for {alone_s:.0f} s …")
        await realtime_load(http, url, keys[REALTIME], size, interval, alone_s, alone)

        flood = Phase("flood", seconds=flood_s, started_at=time.time())
        jobs_per_s = flood_factor * capacity / bulk_n
        log(f"flood for {flood_s:.0f} s: bulk offers {jobs_per_s * bulk_n:.1f} images/s, realtime continues …")
        cpu_before, flood_started = tree_cpu_s(), time.perf_counter()
        await asyncio.gather(
            realtime_load(http, url, keys[REALTIME], size, interval, flood_s, flood),
            bulk_flood(http, url, keys[BULK], size, jobs_per_s, bulk_n, flood_s, flood),
        )
        flood_end = time.time()
        cpu_flood = cpu_by_process(cpu_before, tree_cpu_s(), time.perf_counter() - flood_started)
    log(f"draining {len(flood.bulk_accepted)} accepted bulk jobs …")
    final, drain_s = await drain(config, set(flood.bulk_accepted), drain_timeout_s)
    _, by_id, done_at = job_statuses(config, BULK)
    in_window = [t for t in done_at if flood.started_at <= t <= flood_end]
    return {
        "realtime_jobs": {
            "alone": realtime_breakdown(config, alone.started_at, flood.started_at),
            "flood": realtime_breakdown(config, flood.started_at, flood_end),
        },
        "capacity_images_per_s": capacity,
        "capacity_calibrated": calibrated,
        "bulk_images_per_minute_limit": bulk_limit,
        "phases": {p.name: p.to_dict() for p in (alone, flood)},
        "bulk_images_done_during_flood": len(in_window),
        "bulk_jobs_in_database": len(by_id),
        "bulk_final_status": dict(final),
        "drain_s": drain_s,
        "flood_cpu_by_process": cpu_flood,
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    alone, flood = results["phases"]["alone"], results["phases"]["flood"]
    p95_alone = percentile(alone["realtime_latency_s"], 95)
    p95_flood = percentile(flood["realtime_latency_s"], 95)
    accepted = len(flood["bulk_accepted"])
    final = results["bulk_final_status"]
    terminal = sum(final.get(s, 0) for s in TERMINAL)
    capacity = results["capacity_images_per_s"]
    bulk_rate = results["bulk_images_done_during_flood"] / flood["seconds"]
    return {
        "p50_alone_s": percentile(alone["realtime_latency_s"], 50),
        "p95_alone_s": p95_alone,
        "p50_flood_s": percentile(flood["realtime_latency_s"], 50),
        "p95_flood_s": p95_flood,
        "p95_ratio": ratio(p95_flood, p95_alone),
        "realtime_errors": sum(v for k, v in flood["realtime_status"].items() if k != "200")
        + sum(v for k, v in alone["realtime_status"].items() if k != "200"),
        "offered_images_per_s": flood["bulk_images_offered"] / flood["seconds"],
        "offered_over_capacity": ratio(flood["bulk_images_offered"] / flood["seconds"], capacity),
        "bulk_done_images_per_s": bulk_rate,
        "bulk_share_of_capacity": ratio(bulk_rate, capacity),
        "refused": {k: v for k, v in flood["bulk_answers"].items() if not k.startswith("202")},
        "accepted_jobs": accepted,
        "terminal_jobs": terminal,
        "lost_jobs": accepted - terminal,
        "jobs_in_db_match": results["bulk_jobs_in_database"] == accepted,
    }


def markdown(meta: dict[str, Any], results: dict[str, Any]) -> str:
    s = summarize(results)
    refused = ", ".join(f"{k}: {v}" for k, v in sorted(s["refused"].items())) or "none"
    rows = [
        [
            meta["size"],
            f"{results['capacity_images_per_s']:.2f}"
            + ("" if results.get("capacity_calibrated", True) else " (given)"),
            f"{fmt_num(s['p50_alone_s'], '.2f')} / {fmt_num(s['p95_alone_s'], '.2f')}",
            f"{fmt_num(s['p50_flood_s'], '.2f')} / {fmt_num(s['p95_flood_s'], '.2f')}",
            fmt_num(s["p95_ratio"], ".2f", "×"),
            f"{s['offered_images_per_s']:.1f} ({fmt_num(s['offered_over_capacity'], '.1f', '×')})",
            f"{s['bulk_done_images_per_s']:.2f} ({fmt_num(s['bulk_share_of_capacity'], '.0%')})",
            refused,
            f"{s['accepted_jobs']} / {s['terminal_jobs']} / {s['lost_jobs']}",
        ]
    ]
    table = markdown_table(
        [
            "size",
            "capacity img/s",
            "realtime p50 / p95 alone (s)",
            "p50 / p95 in flood (s)",
            "p95 ratio",
            "bulk offered img/s (× capacity)",
            "bulk done img/s in flood (share of capacity)",
            "bulk refused",
            "accepted / terminal / lost jobs",
        ],
        rows,
    )
    targets = [
        Target("realtime p95 during the flood ÷ alone", s["p95_ratio"], P95_RATIO_TARGET, "≤"),
        Target("bulk offered ÷ capacity", s["offered_over_capacity"], 10.0, "≥"),
        Target("accepted bulk jobs lost", float(s["lost_jobs"]), 0.0, "≤", unit=""),
    ]
    lines = [
        f"`{meta['command']}` — {meta['date']}, {meta['machine']}",
        "",
        *([f"Engine: {engine_description(meta['engine'])}.", ""] if "engine" in meta else []),
        table,
        "",
        *[t.line() for t in targets],
        *[
            f"- realtime jobs {name} (from their rows, p95): queued {fmt_num(b['queued_p95_s'], '.2f', ' s')}, "
            f"running {fmt_num(b['running_p95_s'], '.2f', ' s')}, "
            f"accepted→done {fmt_num(b['accepted_to_done_p95_s'], '.2f', ' s')}"
            for name, b in results.get("realtime_jobs", {}).items()
        ],
        f"- realtime requests that failed: {s['realtime_errors']}; "
        f"bulk jobs in the database = accepted: {s['jobs_in_db_match']}",
    ]
    cpu = results.get("flood_cpu_by_process")
    if cpu:
        top = ", ".join(f"{name} {share:.2f}" for name, share in list(cpu.items())[:8] if share >= 0.01)
        lines.append(
            f"- CPU during the flood, share of one core (this run's processes, the load generator "
            f"`bench` included; {meta.get('logical_cores', '?')} cores): {top}; all {sum(cpu.values()):.2f}"
        )
    return "\n".join(lines)


def main(
    size: Annotated[str, typer.Option(help="Bucket for every request.")] = "64x64",
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between realtime requests.")] = 1.0,
    alone: Annotated[float, typer.Option(min=5, help="Seconds of realtime load alone.")] = 40.0,
    duration: Annotated[float, typer.Option(min=5, help="Seconds of flood (realtime continues).")] = 60.0,
    flood_factor: Annotated[float, typer.Option(min=1, help="Bulk images offered per second ÷ capacity.")] = 10.0,
    bulk_n: Annotated[int, typer.Option(min=1, max=8, help="Images per bulk job.")] = 4,
    bulk_limit_factor: Annotated[
        float, typer.Option(min=0.1, help="Bulk tenant's images/min limit ÷ (capacity × 60).")
    ] = 2.0,
    threads: Annotated[int, typer.Option(min=1, help="Intra-op threads per engine replica.")] = 1,
    calibration_images: Annotated[int, typer.Option(min=8, help="Images in the capacity calibration.")] = 128,
    drain_timeout: Annotated[float, typer.Option(min=10, help="Seconds to wait for accepted jobs to finish.")] = 900,
    capacity: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Images/s the flood and the bulk limit are sized by, instead of calibrating it: "
            "the same offered load in runs that compare two versions.",
        ),
    ] = None,
    engine: EngineChoice = "real",
    json_out: JsonOut = None,
    render: Render = None,
    config_path: Annotated[Path, typer.Option("--config", help="Platform config YAML (pool layout).")] = REPO
    / "deploy"
    / "config"
    / "cpu-pools.yaml",
) -> None:
    """Realtime p95 while a bulk tenant floods at ≥10× capacity; bulk throughput, 429s, nothing lost."""
    if render is not None:
        saved = read_json(render)
        print(markdown(saved["meta"], saved["results"]))
        return
    from zimage_platform.config import load_config

    # The simulated engine: each pool emulates its own slice (platform_config), not one for all.
    base = with_engine(load_config(config_path), engine, slice_=None, precision=None)
    meta = run_meta(sys.argv[1:], size=size)
    with BenchCluster(base) as cluster:
        config = platform_config(cluster, threads)
        meta["engine"] = engine_meta(config)
        keys = {
            REALTIME: add_tenant(config, REALTIME, priority_class="realtime", limits=BENCH_LIMITS),
            CALIBRATION: add_tenant(config, CALIBRATION, priority_class="bulk", limits=BENCH_LIMITS),
        }
        url = cluster.deploy_platform(config)
        log(f"ready after {wait_all_ready([url]):.0f} s")
        results = asyncio.run(
            run_phases(
                url,
                config,
                keys,
                size=size,
                interval=interval,
                alone_s=alone,
                flood_s=duration,
                flood_factor=flood_factor,
                bulk_n=bulk_n,
                bulk_limit_factor=bulk_limit_factor,
                calibration_images=calibration_images,
                drain_timeout_s=drain_timeout,
                capacity=capacity,
            )
        )
    meta["load_average_after"] = os.getloadavg()
    write_json(json_out, {"meta": meta, "results": results})
    print(markdown(meta, results))
