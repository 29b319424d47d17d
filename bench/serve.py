"""Serve benchmark: closed-loop HTTP load on the real platform, batch merging on vs max batch 1.

How it measures, and why:

* The real platform, over HTTP: two Serve applications built by ``build_app`` on one local Ray
  cluster, with the embedded SeaweedFS S3, a SQLite job database each, the tiny checkpoint on
  ONNX Runtime. ``merge`` keeps turbo's batch profile; ``nomerge`` sets its max batch to 1. Both
  keep the pool's merge wait (``pools.*.max_wait_ms``). Only turbo is deployed (one engine
  deployment per app instead of three) to save memory and CPU on a 2-core machine.
* Closed loop: each of N clients sends ``POST /v1/images/generations``, waits for the answer,
  sends again. A cell runs a warm-up, then a measured window; throughput counts images completed
  in the window, latency percentiles the requests sent in it. Every prompt is new, so the text
  encoder runs for every image (the prompt cache never hits).
* Alternation: every (size, clients) cell runs on one app and then the other, the order rotating,
  for several rounds, so a noisy neighbour hits both configurations alike. Before each run the
  benchmark waits for other processes (not its own Ray cluster) to quieten, and records the CPU
  share they took during the run.
* Batch sizes: read afterwards from the job rows (``job_images.batch_size``), not during the load.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import (
    BENCH_LIMITS,
    BENCH_TENANT,
    VARIANT,
    BenchCluster,
    ConfigPath,
    CpuSnapshot,
    HttpSample,
    JsonOut,
    MaxNoise,
    QuietWait,
    Render,
    Target,
    add_tenant,
    fmt_num,
    generation_body,
    log,
    markdown_table,
    parse_ints,
    parse_sizes,
    percentile,
    ratio,
    read_job_times,
    read_json,
    run_meta,
    timed_post,
    wait_all_ready,
    wait_for_others_quiet,
    write_json,
)

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

MERGE, NOMERGE = "merge", "nomerge"
CONFIGS = (MERGE, NOMERGE)
#: Merging's throughput over max batch 1, at this size, at the highest concurrency measured.
TARGET_SIZE = "64x64"
MERGE_GAIN_TARGET = 1.8
#: A request slower than this is a failure, not a sample (the platform's own sync timeout is 300 s).
REQUEST_TIMEOUT_S = 300.0


@dataclass
class Cell:
    """One measured run: a configuration at one size and concurrency, in one round."""

    label: str
    size: str
    clients: int
    round: int
    #: Epoch seconds where the measured window starts, and its length.
    window_start: float
    duration_s: float
    #: CPU share other processes took during the run (warm-up, window and drain).
    others: float
    quiet_wait_s: float


async def closed_loop(
    url: str, key: str, *, label: str, size: str, clients: int, round_: int, warmup_s: float, duration_s: float
) -> tuple[float, list[HttpSample]]:
    """Run ``clients`` send-wait-send loops until the window ends; ``(window start epoch, samples)``."""
    import httpx

    samples: list[HttpSample] = []
    window_start = time.time() + warmup_s
    window_end = window_start + duration_s
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient, index: int) -> None:
        sent = 0
        while time.time() < window_end:
            tag = f"{label} round {round_} {size} x{clients} client {index} #{sent}"
            body = generation_body(tag, size, seed=index * 100_000 + sent)
            response, sent_at, latency = await timed_post(http, f"{url}/v1/images/generations", body, headers)
            status = response.status_code if response is not None else 0
            job_id = response.json().get("job_id") if response is not None and status == 200 else None
            samples.append(HttpSample(label, size, round_, clients, sent_at, latency, status, job_id=job_id))
            sent += 1

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        await asyncio.gather(*(client(http, i) for i in range(clients)))
    return window_start, samples


@dataclass
class Report:
    """One run's cells and samples; built the same way for a fresh run and a saved one (``--render``)."""

    meta: dict[str, Any]
    cells: list[Cell]
    samples: list[HttpSample]

    def _cells(self, label: str, size: str, clients: int) -> list[Cell]:
        return [c for c in self.cells if (c.label, c.size, c.clients) == (label, size, clients)]

    def _samples(self, cell: Cell) -> list[HttpSample]:
        return [
            s
            for s in self.samples
            if (s.label, s.size, s.clients, s.round) == (cell.label, cell.size, cell.clients, cell.round)
        ]

    def completed(self, label: str, size: str, clients: int) -> list[HttpSample]:
        """Successful requests that finished inside a measured window (what throughput counts)."""
        return [
            s
            for c in self._cells(label, size, clients)
            for s in self._samples(c)
            if s.status == 200 and c.window_start <= s.sent_at + s.latency_s <= c.window_start + c.duration_s
        ]

    def sent(self, label: str, size: str, clients: int) -> list[HttpSample]:
        """Requests sent inside a measured window (what latency percentiles and errors use)."""
        return [
            s
            for c in self._cells(label, size, clients)
            for s in self._samples(c)
            if c.window_start <= s.sent_at <= c.window_start + c.duration_s
        ]

    def throughput(self, label: str, size: str, clients: int) -> float | None:
        """Images per second over all rounds' windows together."""
        window = sum(c.duration_s for c in self._cells(label, size, clients))
        return len(self.completed(label, size, clients)) / window if window else None

    def round_throughputs(self, label: str, size: str, clients: int) -> list[float]:
        """Images per second of each round's window (how much the rounds disagree)."""
        return [
            sum(
                1
                for s in self._samples(c)
                if s.status == 200 and 0 <= s.sent_at + s.latency_s - c.window_start <= c.duration_s
            )
            / c.duration_s
            for c in self._cells(label, size, clients)
        ]

    def engine_busy(self, label: str, size: str, clients: int) -> tuple[float | None, float | None]:
        """``(share of the windows the engine spent inside engine.run, engine ms per image)``.

        Each image row carries its batch's engine time ÷ batch size, so the sum over the images
        completed in the windows is the engine's busy time (for batches that finished in them).
        """
        done = [s.job.engine_s for s in self.completed(label, size, clients) if s.job and s.job.engine_s is not None]
        window = sum(c.duration_s for c in self._cells(label, size, clients))
        if not done or not window:
            return None, None
        return sum(done) / window, sum(done) / len(done) * 1000

    def latency(self, label: str, size: str, clients: int, q: float) -> float | None:
        return percentile([s.latency_s for s in self.sent(label, size, clients) if s.status == 200], q)

    def batch_sizes(self, label: str, size: str, clients: int) -> Counter[int]:
        """Images per batch size, over the images of the requests sent in the windows."""
        return Counter(
            s.job.batch_size
            for s in self.sent(label, size, clients)
            if s.job is not None and s.job.batch_size is not None
        )

    def others(self, label: str, size: str, clients: int) -> float | None:
        cells = self._cells(label, size, clients)
        return statistics.mean(c.others for c in cells) if cells else None

    def gain(self, size: str, clients: int) -> float | None:
        return ratio(self.throughput(MERGE, size, clients), self.throughput(NOMERGE, size, clients))

    def targets(self) -> list[Target]:
        saturation = max(self.meta["clients"])
        targets = [
            Target(
                f"merging vs max batch 1, throughput at {TARGET_SIZE} with {saturation} clients (saturation)",
                self.gain(TARGET_SIZE, saturation) if TARGET_SIZE in self.meta["sizes"] else None,
                MERGE_GAIN_TARGET,
            )
        ]
        for size in self.meta["sizes"]:
            if size != TARGET_SIZE:
                targets.append(
                    Target(
                        f"merging vs max batch 1, throughput at {size} with {saturation} clients",
                        self.gain(size, saturation),
                        None,
                    )
                )
        return targets

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        samples = [HttpSample.from_dict(s) for s in data["samples"]]
        return cls(meta=data["meta"], cells=[Cell(**c) for c in data["cells"]], samples=samples)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "targets": [asdict(t) | {"verdict": t.verdict} for t in self.targets()],
            "cells": [asdict(c) for c in self.cells],
            "samples": [asdict(s) for s in self.samples],
        }

    def markdown(self) -> str:
        m = self.meta
        sizes, clients = m["sizes"], m["clients"]
        rows = []
        for size in sizes:
            for n in clients:
                for label in CONFIGS:
                    histogram = self.batch_sizes(label, size, n)
                    images = sum(histogram.values())
                    sent = self.sent(label, size, n)
                    busy, engine_ms = self.engine_busy(label, size, n)
                    per_round = ", ".join(f"{t:.1f}" for t in self.round_throughputs(label, size, n))
                    rows.append(
                        [
                            label,
                            size,
                            str(n),
                            f"{fmt_num(self.throughput(label, size, n), '.1f')} ({per_round})",
                            *(fmt_num(self.latency(label, size, n, q), ".3f") for q in (50, 95, 99)),
                            fmt_num(sum(b * c for b, c in histogram.items()) / images if images else None, ".2f"),
                            " ".join(f"{b}:{c}" for b, c in sorted(histogram.items())) or "n/a",
                            fmt_num(busy, ".0%"),
                            fmt_num(engine_ms, ".0f"),
                            f"{sum(s.status != 200 for s in sent)}/{len(sent)}",
                            fmt_num(self.others(label, size, n), ".0%"),
                        ]
                    )
        return "\n".join(
            [
                f"### Serve benchmark, {m['date']}",
                "",
                f"`{m['command']}` (source {m['source']})",
                "",
                f"{m['machine']}; Python {m['python']}; "
                + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
                + f". Wall time {m['wall_s']:.0f} s ({m['ready_s']:.0f} s starting the cluster and apps, "
                f"{m['quiet_wait_s']:.0f} s waiting for a quiet machine); load average "
                f"{m['load_average_before'][0]:.2f} before, {m['load_average_after'][0]:.2f} after.",
                "",
                f"Platform: `build_app` on Ray Serve, SeaweedFS S3, SQLite, variant `{VARIANT}` only, "
                f"{m['backend']} backend, tiny checkpoint, 8 steps, one engine replica per app "
                f"(engine threads: {m['engine_threads'] or 'runtime default'}). "
                + "; ".join(
                    f"`{label}`: max batch {c['max_batch']}, merge wait `pools.{c['pool']}.max_wait_ms` = "
                    f"{json.dumps(c['max_wait_ms'])}"
                    for label, c in m["configs"].items()
                )
                + f". Each cell: {m['warmup_s']:.0f} s warm-up + {m['duration_s']:.0f} s measured, "
                f"{m['rounds']} rounds, configurations alternated. Throughput: images completed in the windows "
                "÷ window time; latency: requests sent in the windows; batch sizes: images per batch size; "
                "engine busy: share of the windows the engine replica spent inside `engine.run` (from the "
                "images' `engine_s`); engine ms/img: that time per image; others: CPU share of other "
                "processes during the runs (noise).",
                "",
                markdown_table(
                    [
                        "Config",
                        "Size",
                        "Clients",
                        "Images/s (per round)",
                        "p50 s",
                        "p95 s",
                        "p99 s",
                        "Mean batch",
                        "Batch sizes (size:images)",
                        "Engine busy",
                        "Engine ms/img",
                        "Errors",
                        "Others",
                    ],
                    rows,
                ),
                "",
                "Throughput, merging ÷ max batch 1:",
                "",
                markdown_table(
                    ["Size", *(f"{n} clients" for n in clients)],
                    [[size, *(fmt_num(self.gain(size, n), ".2f", "×") for n in clients)] for size in sizes],
                ),
                "",
                "Targets:",
                "",
                *(t.line() for t in self.targets()),
            ]
        )


def _configs(cluster: BenchCluster) -> dict[str, PlatformConfig]:
    """``merge``: turbo's own batch profile; ``nomerge``: max batch 1, per-bucket overrides cleared."""
    merge = cluster.platform_config(MERGE, f"/{MERGE}")
    spec = merge.variant(VARIANT)
    single = spec.model_copy(update={"batch": spec.batch.model_copy(update={"max_batch": 1, "per_bucket": {}})})
    return {MERGE: merge, NOMERGE: cluster.platform_config(NOMERGE, f"/{NOMERGE}", spec=single)}


async def _prewarm(url: str, key: str, sizes: list[str], burst: int) -> None:
    """First requests per size (allocations, ONNX Runtime shapes) outside any measurement: a burst, then one."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
        for size in sizes:
            for count in (burst, 1):
                bodies = [generation_body(f"prewarm {size} x{count} #{i}", size, seed=i) for i in range(count)]
                await asyncio.gather(
                    *(timed_post(http, f"{url}/v1/images/generations", body, headers) for body in bodies)
                )


def _config_meta(config: PlatformConfig, sizes: list[str]) -> dict[str, Any]:
    """What distinguishes a configuration in the report: its merge wait and max batch."""
    from zimage_platform.pipeline.buckets import Resolution

    pool = next(iter(config.pools))
    batches = {config.variant(VARIANT).batch.for_bucket(Resolution.parse(s)) for s in sizes}
    return {
        "pool": pool,
        "max_wait_ms": config.pools[pool].max_wait_ms,
        "max_batch": batches.pop() if len(batches) == 1 else "/".join(map(str, sorted(batches))),
        "app_name": config.serve.app_name,
        "route_prefix": config.serve.route_prefix,
    }


def run_benchmark(
    base: PlatformConfig,
    sizes: list[str],
    clients: list[int],
    *,
    rounds: int,
    warmup_s: float,
    duration_s: float,
    max_noise: float,
    quiet_wait: float,
) -> tuple[dict[str, Any], list[Cell], list[HttpSample]]:
    started = time.perf_counter()
    cells: list[Cell] = []
    samples: list[HttpSample] = []
    with BenchCluster(base) as cluster:
        configs = _configs(cluster)
        key = add_tenant(configs[MERGE], BENCH_TENANT, limits=BENCH_LIMITS)
        urls = {label: cluster.deploy_platform(config) for label, config in configs.items()}
        log("waiting for both apps to be ready (engines load and warm up) …")
        wait_all_ready(list(urls.values()))
        for label, url in urls.items():
            log(f"pre-warming {label} …")
            asyncio.run(_prewarm(url, key, sizes, configs[MERGE].variant(VARIANT).batch.max_batch))
        ready_s = time.perf_counter() - started
        waited = 0.0
        plan = [(size, n) for size in sizes for n in clients]
        for round_ in range(rounds):
            for index, (size, n) in enumerate(plan):
                order = CONFIGS if (round_ * len(plan) + index) % 2 == 0 else CONFIGS[::-1]
                for label in order:
                    quiet = wait_for_others_quiet(max_noise, quiet_wait)
                    waited += quiet
                    before = CpuSnapshot.take()
                    window_start, got = asyncio.run(
                        closed_loop(
                            urls[label],
                            key,
                            label=label,
                            size=size,
                            clients=n,
                            round_=round_,
                            warmup_s=warmup_s,
                            duration_s=duration_s,
                        )
                    )
                    others = before.others_share(CpuSnapshot.take())
                    cells.append(Cell(label, size, n, round_, window_start, duration_s, others, quiet))
                    samples += got
                    done = sum(1 for s in got if s.status == 200)
                    log(f"round {round_ + 1}/{rounds} {label:8} {size:8} x{n:<3}: {done} images, others {others:.0%}")
        for label, config in configs.items():
            ids = [s.job_id for s in samples if s.label == label and s.job_id]
            times = read_job_times(config, ids)
            for s in samples:
                if s.label == label and s.job_id:
                    s.job = times.get(s.job_id)
        meta = {
            "backend": base.engine.backend,
            "engine_threads": base.engine.threads,
            "configs": {label: _config_meta(config, sizes) for label, config in configs.items()},
            "ready_s": ready_s,
            "quiet_wait_s": waited,
        }
    meta["wall_s"] = time.perf_counter() - started
    return meta, cells, samples


def main(
    sizes: Annotated[str, typer.Option(help="Comma-separated buckets.")] = "64x64,128x128",
    clients: Annotated[str, typer.Option(help="Comma-separated concurrent client counts.")] = "1,8,32,64",
    rounds: Annotated[int, typer.Option(min=1, help="Times every cell runs on each configuration.")] = 2,
    duration: Annotated[float, typer.Option(min=1, help="Measured seconds per cell and round.")] = 10.0,
    warmup: Annotated[float, typer.Option(min=0, help="Unmeasured seconds before each window.")] = 3.0,
    max_noise: MaxNoise = 0.1,
    quiet_wait: QuietWait = 3.0,
    json_out: JsonOut = None,
    config_path: ConfigPath = None,
    render: Render = None,
) -> None:
    """Real platform over HTTP, closed loop: batch merging vs max batch 1 (images/s, latency, batch sizes)."""
    if render is not None:
        print(Report.from_json(read_json(render)).markdown())
        return
    from zimage_platform.config import load_config

    base = load_config(config_path)
    size_list = parse_sizes(base, sizes, param="--sizes")
    client_list = parse_ints(clients, param="--clients")
    meta = run_meta(sys.argv[1:])
    measured, cells, samples = run_benchmark(
        base,
        size_list,
        client_list,
        rounds=rounds,
        warmup_s=warmup,
        duration_s=duration,
        max_noise=max_noise,
        quiet_wait=quiet_wait,
    )
    meta |= measured | {
        "sizes": size_list,
        "clients": client_list,
        "rounds": rounds,
        "duration_s": duration,
        "warmup_s": warmup,
        "max_noise": max_noise,
        "load_average_after": os.getloadavg(),
    }
    report = Report(meta, cells, samples)
    print(report.markdown())
    write_json(json_out, report.to_json())
