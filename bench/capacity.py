"""Capacity benchmark: the capacity simulator against the real platform on the tiny model.

How it measures, and why:

* The real platform, over HTTP on 127.0.0.1: ``build_app`` on a local Ray with the embedded
  SeaweedFS S3 and a SQLite job database (``bench.common.BenchCluster``), the tiny checkpoint on
  the configured backend, one engine replica in one pool that serves all three priority classes
  (strict priority, batch merging). One tenant per class.
* Calibration: a few sequential requests give the service time of a single image; the offered
  load is then set to ``--load`` times what one replica serves one image at a time.
* Load: open loop, Poisson arrivals per class (``--mix``), bounded by ``--duration`` and
  ``--max-requests``; every request is a synchronous ``POST /v1/images/generations`` and its
  latency is measured by the client.
* The simulator then runs the platform's own scheduler code on the *same* arrival times (a
  replayed trace), with the engine latency measured in this run: from the job rows, a batch's
  service time (claim → image recorded, by batch size) and the per-request time outside the
  scheduler (HTTP latency minus job creation → finish). Simulated vs measured p95 per class is
  the verdict (target: within 25 %).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import (
    BENCH_LIMITS,
    VARIANT,
    BenchCluster,
    ConfigPath,
    JsonOut,
    Target,
    add_tenant,
    generation_body,
    log,
    markdown_table,
    open_loop,
    percentile,
    read_job_times,
    read_json,
    run_meta,
    timed_post,
    wait_all_ready,
    write_json,
)

if TYPE_CHECKING:
    import httpx

CLASSES = ("realtime", "standard", "bulk")
POOL = "cpu"
TOLERANCE = 0.25
REQUEST_TIMEOUT_S = 300.0


async def _sequential(url: str, key: str, size: str, n: int, tag: str) -> list[tuple[float, str | None]]:
    """``n`` requests one after the other: (latency, job id)."""
    import httpx

    out = []
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
        for i in range(n):
            response, _, latency = await timed_post(
                http,
                f"{url}/v1/images/generations",
                generation_body(f"{tag} #{i}", size, seed=i),
                {"Authorization": f"Bearer {key}"},
            )
            ok = response is not None and response.status_code == 200
            out.append((latency, response.json().get("job_id") if ok else None))
    return out


async def _burst(url: str, key: str, size: str, n: int) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
        await asyncio.gather(
            *(
                timed_post(
                    http,
                    f"{url}/v1/images/generations",
                    generation_body(f"warm burst #{i}", size, seed=i),
                    {"Authorization": f"Bearer {key}"},
                )
                for i in range(n)
            )
        )


def schedule(rates: dict[str, float], duration: float, max_requests: int, seed: int) -> list[tuple[float, str]]:
    """Poisson arrival times per class, merged, cut at ``duration`` and ``max_requests``."""
    arrivals: list[tuple[float, str]] = []
    for cls, rate in rates.items():
        rng, t = random.Random(f"{seed}:{cls}"), 0.0
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= duration:
                break
            arrivals.append((t, cls))
    return sorted(arrivals)[:max_requests]


async def _open_loop(url: str, keys: dict[str, str], size: str, plan: list[tuple[float, str]]) -> list[dict[str, Any]]:
    async def send(http: httpx.AsyncClient, i: int, cls: str) -> dict[str, Any]:
        response, _, latency = await timed_post(
            http,
            f"{url}/v1/images/generations",
            generation_body(f"capacity {cls} #{i}", size, seed=i),
            {"Authorization": f"Bearer {keys[cls]}"},
        )
        status = response.status_code if response is not None else 0
        job = response.json().get("job_id") if status == 200 else None
        return {"latency_s": latency, "status": status, "job_id": job}

    answers = await open_loop(plan, send, timeout_s=REQUEST_TIMEOUT_S)
    return [{"class": cls, "at": at, "sent": sent, **a} for (at, cls), (sent, a) in zip(plan, answers, strict=True)]


def bench_config(config_path: Path | None, max_wait_ms: float) -> Any:
    """The platform config with one pool serving every class (one replica, the variant's batches)."""
    from zimage_platform.config import PoolConfig, load_config

    pool = PoolConfig(
        classes=list(CLASSES),
        variants=[VARIANT],
        num_cpus=0.5,
        max_wait_ms={"default": max_wait_ms},
        queue_bound={c: 100_000 for c in CLASSES},
        queue_deadline_s={c: 3600.0 for c in CLASSES},
    )
    return load_config(config_path).model_copy(update={"pools": {POOL: pool}})


def run(
    base: Any, *, size: str, duration: float, max_requests: int, load: float, mix: list[float], seed: int
) -> dict[str, Any]:
    """Start the platform, calibrate, send the open-loop load; samples carry their job's timestamps."""
    started = time.perf_counter()
    with BenchCluster(base) as cluster:
        config = cluster.platform_config("capacity", "/capacity")
        keys = {c: add_tenant(config, f"bench-{c}", priority_class=c, limits=BENCH_LIMITS) for c in CLASSES}
        url = cluster.deploy_platform(config)
        log("waiting for the app (engine loads and warms up) …")
        wait_all_ready([url])
        log("pre-warming …")
        asyncio.run(_burst(url, keys["standard"], size, config.variant(VARIANT).batch.max_batch))
        calibration = asyncio.run(_sequential(url, keys["standard"], size, 8, "calibration"))
        single = statistics.median(lat for lat, _ in calibration[2:])
        total_rate = load / single
        rates = {c: total_rate * share for c, share in zip(CLASSES, mix, strict=True)}
        plan = schedule(rates, duration, max_requests, seed)
        log(f"single request {single * 1000:.0f} ms → {total_rate:.1f} req/s offered; {len(plan)} requests …")
        samples = asyncio.run(_open_loop(url, keys, size, plan))
        times = read_job_times(config, [s["job_id"] for s in samples if s["job_id"]])
    for sample in samples:
        job = times.get(sample["job_id"]) if sample["job_id"] else None
        sample["job"] = asdict(job) if job is not None else None
    return {"single_s": single, "rates": rates, "samples": samples, "wall_s": time.perf_counter() - started}


#: Bins of "requests in the system when this one arrived" for the outside-time samples.
LOAD_BINS = (0, 2, 4, 8, 16)


def fit(samples: list[dict[str, Any]], size: str) -> Any:
    """The engine latency of this run, from the job rows.

    A batch holds its engine slot from its dispatch until its last job is finished (claim, engine,
    S3, ledger and job rows written one job after the other), so a batch's service time is its
    jobs' last ``finished_at`` − first ``started_at``; a batch's jobs share one ``engine_s`` (the
    batch's engine time ÷ its size), which groups them. A request's time outside the scheduler
    (HTTP latency − (job finished − job created)) grows with the load on this 2-core machine (the
    engine's threads, the ingress, SQLite and S3 share it), so it is kept by how many requests
    were in the system when the request was sent.
    """
    from zimage_platform.scheduling.simulation import MeasuredLatency

    done = [s for s in samples if s.get("job") and s["job"]["finished_at"] is not None and s["job"]["started_at"]]
    batches: dict[tuple[float, int], list[dict[str, Any]]] = {}
    outside: dict[int, list[float]] = {}
    for s in done:
        job = s["job"]
        busy = sum(1 for o in samples if o is not s and o["sent"] <= s["sent"] < o["sent"] + o["latency_s"])
        bin_ = max(b for b in LOAD_BINS if b <= busy)
        outside.setdefault(bin_, []).append(s["latency_s"] - (job["finished_at"] - job["created_at"]))
        if job["batch_size"] and job["engine_s"] is not None:
            batches.setdefault((job["engine_s"], int(job["batch_size"])), []).append(job)
    service: dict[int, list[float]] = {}
    for (_, n), jobs in batches.items():
        held = max(j["finished_at"] for j in jobs) - min(j["started_at"] for j in jobs)
        service.setdefault(n, []).append(held)
    return MeasuredLatency.from_samples({size: service}, outside, steps=8, source="this run")


def simulate_run(config: Any, size: str, samples: list[dict[str, Any]]) -> tuple[Any, Any]:
    """The platform's scheduler in simulated time, on the measured arrivals and engine latency."""
    from zimage_platform.scheduling.simulation import LoadProfile, simulate

    latency = fit(samples, size)
    streams = [
        {
            "name": cls,
            "tenant": f"bench-{cls}",
            "priority_class": cls,
            "variant": VARIANT,
            "size": size,
            "steps": 8,
            "times": [s["sent"] for s in samples if s["class"] == cls],
        }
        for cls in CLASSES
    ]
    horizon = max(s["sent"] for s in samples) + 1.0
    profile = LoadProfile.model_validate(
        {"name": "capacity-bench", "duration_s": horizon, "max_drain_s": 3600, "streams": streams}
    )
    return latency, simulate(config, profile, latency, replicas={(POOL, VARIANT): 1}, autoscale=False)


def report(meta: dict[str, Any], measured: dict[str, Any], latency: Any, result: Any) -> str:
    rows, targets = [], []
    samples = measured["samples"]
    for cls in CLASSES:
        lat = [s["latency_s"] for s in samples if s["class"] == cls and s["status"] == 200]
        failed = sum(1 for s in samples if s["class"] == cls and s["status"] != 200)
        simulated = result.classes.get(cls, {}).get("latency_s", {})
        m50, m95 = percentile(lat, 50), percentile(lat, 95)
        s50, s95 = simulated.get("p50"), simulated.get("p95")
        error = abs(s95 - m95) / m95 if m95 and s95 is not None else None
        rows.append(
            [
                cls,
                str(len(lat)),
                str(failed),
                f"{measured['rates'][cls]:.2f}",
                f"{m50:.3f}",
                f"{m95:.3f}",
                f"{s50:.3f}",
                f"{s95:.3f}",
                f"{error:.0%}" if error is not None else "n/a",
            ]
        )
        targets.append(Target(f"{cls}: |simulated − measured| p95 / measured", error, TOLERANCE, op="≤", unit=""))
    line = ", ".join(f"batch {n}: {s * 1000:.0f} ms" for n, s in sorted(next(iter(latency.points.values())).items()))
    lines = [
        f"Command: `{meta['command']}` ({meta['date']}, source {meta['source']}; {meta['machine']})",
        "",
        f"Single image {measured['single_s'] * 1000:.0f} ms; mean service time per batch (claim → recorded) "
        f"{line}; outside the scheduler {latency.request_overhead_s * 1000:.0f} ms per request on average "
        f"(by requests in the system: "
        f"{', '.join(f'{k}+: {statistics.fmean(v) * 1000:.0f} ms' for k, v in latency.overheads.items())}); "
        f"simulated in {result.wall_s:.2f} s; whole run {measured['wall_s']:.0f} s.",
        "",
        markdown_table(
            [
                "Class",
                "Requests",
                "Failed",
                "Offered req/s",
                "Measured p50 s",
                "Measured p95 s",
                "Simulated p50 s",
                "Simulated p95 s",
                "p95 error",
            ],
            rows,
        ),
        "",
        *(t.line() for t in targets),
    ]
    return "\n".join(lines)


def main(
    size: Annotated[str, typer.Option(help="Bucket every request uses.")] = "64x64",
    duration: Annotated[float, typer.Option(min=5, help="Seconds of arrivals (open loop).")] = 60.0,
    max_requests: Annotated[int, typer.Option(min=10, help="At most this many requests.")] = 600,
    load: Annotated[float, typer.Option(min=0.05, help="Offered load ÷ one replica's single-image rate.")] = 0.9,
    mix: Annotated[str, typer.Option(help="Shares of realtime,standard,bulk.")] = "0.3,0.4,0.3",
    seed: Annotated[int, typer.Option()] = 1,
    max_wait_ms: Annotated[float, typer.Option(help="The pool's merge wait.")] = 20.0,
    json_out: JsonOut = None,
    config_path: ConfigPath = None,
    from_json: Annotated[
        Path | None, typer.Option(help="Re-simulate a saved --json-out run instead of measuring.")
    ] = None,
) -> None:
    """Simulator vs the real platform: p95 per class, simulated with the engine latency of the same run."""
    if from_json is not None:
        saved = read_json(from_json)
        meta, measured = saved["meta"], saved["measured"]
        size, max_wait_ms = saved["size"], saved["max_wait_ms"]
    else:
        shares = [float(x) for x in mix.split(",")]
        if len(shares) != 3 or min(shares) < 0 or not sum(shares):
            raise typer.BadParameter("three non-negative shares: realtime,standard,bulk", param_hint="--mix")
        meta = run_meta(sys.argv[1:])
        measured = run(
            bench_config(config_path, max_wait_ms),
            size=size,
            duration=duration,
            max_requests=max_requests,
            load=load,
            mix=[x / sum(shares) for x in shares],
            seed=seed,
        )
    latency, result = simulate_run(bench_config(config_path, max_wait_ms), size, measured["samples"])
    print(report(meta, measured, latency, result))
    if from_json is None:
        write_json(
            json_out,
            {
                "meta": meta,
                "size": size,
                "max_wait_ms": max_wait_ms,
                "measured": measured,
                "latency_model": latency.describe(),
                "simulation": json.loads(json.dumps(result.to_dict(), default=str)),
            },
        )
