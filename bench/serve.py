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
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import (
    BENCH_LIMITS,
    BENCH_TENANT,
    REQUEST_TIMEOUT_S,
    VARIANT,
    BenchCluster,
    CellDuration,
    CellWarmup,
    ClosedLoopReport,
    ClosedLoopRuns,
    ConfigPath,
    EngineChoice,
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
    markdown_table,
    parse_ints,
    parse_sizes,
    ratio,
    read_json,
    run_meta,
    simulated_latency,
    targets_section,
    timed_post,
    wait_all_ready,
    with_engine,
    write_json,
)

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

MERGE, NOMERGE = "merge", "nomerge"
CONFIGS = (MERGE, NOMERGE)
#: Merging's throughput over max batch 1, at this size, at the highest concurrency measured.
TARGET_SIZE = "64x64"
MERGE_GAIN_TARGET = 1.8
#: On the simulated engine: merging's gain ÷ the latency model's own batch gain, at least.
SIMULATED_GAIN_SHARE = 0.9


class Report(ClosedLoopReport):
    """Batch merging vs max batch 1: throughput, latency, batch sizes and engine use per cell."""

    def engine_busy(self, label: str, size: str, clients: int) -> tuple[float | None, float | None]:
        """``(share of the windows the engine spent inside engine.run, engine ms per image)``.

        Each image row carries its batch's engine time ÷ batch size, so the sum over the images
        completed in the windows is the engine's busy time (for batches that finished in them).
        """
        done = [s.job.engine_s for s in self.completed(label, size, clients) if s.job and s.job.engine_s is not None]
        window = sum(c.duration_s for c in self.cells_of(label, size, clients))
        if not done or not window:
            return None, None
        return sum(done) / window, sum(done) / len(done) * 1000

    def batch_sizes(self, label: str, size: str, clients: int) -> Counter[int]:
        """Images per batch size, over the images of the requests sent in the windows."""
        return Counter(
            s.job.batch_size
            for s in self.sent(label, size, clients)
            if s.job is not None and s.job.batch_size is not None
        )

    def gain(self, size: str, clients: int) -> float | None:
        return ratio(self.throughput(MERGE, size, clients), self.throughput(NOMERGE, size, clients))

    def targets(self) -> list[Target]:
        if self.meta.get("backend") == "simulated":
            return self.simulated_targets()
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

    def simulated_targets(self) -> list[Target]:
        """On the simulated engine the engine's own batch gain is known (the latency model's
        ``batch_seconds(1)·B / batch_seconds(B)``): merging should deliver most of it."""
        saturation = max(self.meta["clients"])
        sim = self.meta["simulated"]
        targets = []
        for size in self.meta["sizes"]:
            model_gain, batch = sim["model_gain"][size], sim["max_batch"][size]
            measured = self.gain(size, saturation)
            targets += [
                Target(
                    f"merging gain at {size}, {saturation} clients (saturation) ÷ the latency model's batch gain "
                    f"({model_gain:.2f}× at batch {batch})",
                    ratio(measured, model_gain),
                    SIMULATED_GAIN_SHARE if size == TARGET_SIZE else None,
                ),
                Target(f"merging vs max batch 1 at {size}, {saturation} clients", measured, None),
            ]
        return targets

    def markdown(self) -> str:
        m = self.meta
        sizes, clients = m["sizes"], m["clients"]
        rows = []
        for size in sizes:
            for n in clients:
                for label in CONFIGS:
                    histogram = self.batch_sizes(label, size, n)
                    images = sum(histogram.values())
                    busy, engine_ms = self.engine_busy(label, size, n)
                    rows.append(
                        [
                            label,
                            size,
                            str(n),
                            self.images_per_s(label, size, n),
                            *(fmt_num(self.latency(label, size, n, q), ".3f") for q in (50, 95, 99)),
                            fmt_num(sum(b * c for b, c in histogram.items()) / images if images else None, ".2f"),
                            " ".join(f"{b}:{c}" for b, c in sorted(histogram.items())) or "n/a",
                            fmt_num(busy, ".0%"),
                            fmt_num(engine_ms, ".0f"),
                            *self.errors_and_others(label, size, n),
                        ]
                    )
        return "\n".join(
            [
                *self.heading("Serve benchmark", "the cluster and apps"),
                f"Platform: `build_app` on Ray Serve, SeaweedFS S3, SQLite, variant `{VARIANT}` only, "
                f"{engine_description(m)}, 8 steps, one engine replica per app "
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
                *(
                    [
                        "The simulated engine's latency model (what each batch sleeps): "
                        + "; ".join(
                            f"{size}: {sim['batch_ms'][size]['1']:.0f} ms for 1, "
                            f"{sim['batch_ms'][size][str(sim['max_batch'][size])]:.0f} ms for "
                            f"{sim['max_batch'][size]} (gain {sim['model_gain'][size]:.2f}×)"
                            for size in sizes
                        )
                        + ".",
                        "",
                    ]
                    if (sim := m.get("simulated"))
                    else []
                ),
                "Throughput, merging ÷ max batch 1:",
                "",
                markdown_table(
                    ["Size", *(f"{n} clients" for n in clients)],
                    [[size, *(fmt_num(self.gain(size, n), ".2f", "×") for n in clients)] for size in sizes],
                ),
                "",
                *targets_section(self.targets()),
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


def _simulated_meta(config: PlatformConfig, sizes: list[str]) -> dict[str, Any]:
    """The latency model's figures for the ``merge`` configuration's batches: what to expect."""
    from zimage_platform.pipeline.buckets import Resolution

    latency = simulated_latency(config)
    batches = {size: config.variant(VARIANT).batch.for_bucket(Resolution.parse(size)) for size in sizes}
    keys = {size: latency.key(size, 8) for size in sizes}
    return {
        "model": latency.describe(),
        "max_batch": batches,
        "batch_ms": {
            size: {str(n): latency.batch_seconds(keys[size], n) * 1000 for n in sorted({1, batches[size]})}
            for size in sizes
        },
        "model_gain": {size: latency.batch_gain(keys[size], batches[size]) for size in sizes},
    }


def run_benchmark(
    base: PlatformConfig,
    sizes: list[str],
    clients: list[int],
    runs: ClosedLoopRuns,
) -> dict[str, Any]:
    """Both apps on one cluster, every cell of ``runs`` on each; what the report records about the run."""
    started = time.perf_counter()
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
        plan = [(size, n) for size in sizes for n in clients]
        for round_, (size, n), label in runs.schedule(plan, CONFIGS):
            runs.measure(urls[label], key, label, size, n, round_, f"{label:8} {size:8}")
        for label, config in configs.items():
            attach_job_times(config, [s for s in runs.samples if s.label == label])
        meta = {
            **engine_meta(base),
            "engine_threads": base.engine.threads,
            "configs": {label: _config_meta(config, sizes) for label, config in configs.items()},
            "ready_s": ready_s,
            "quiet_wait_s": runs.quiet_wait_s,
        }
    meta["wall_s"] = time.perf_counter() - started
    return meta


def main(
    sizes: Annotated[str, typer.Option(help="Comma-separated buckets.")] = "64x64,128x128",
    clients: Annotated[str, typer.Option(help="Comma-separated concurrent client counts.")] = "1,8,32,64",
    rounds: Annotated[int, typer.Option(min=1, help="Times every cell runs on each configuration.")] = 2,
    duration: CellDuration = 10.0,
    warmup: CellWarmup = 3.0,
    max_noise: MaxNoise = 0.1,
    quiet_wait: QuietWait = 3.0,
    engine: EngineChoice = "real",
    json_out: JsonOut = None,
    config_path: ConfigPath = None,
    render: Render = None,
) -> None:
    """Real platform over HTTP, closed loop: batch merging vs max batch 1 (images/s, latency, batch sizes)."""
    if render is not None:
        print(Report.from_json(read_json(render)).markdown())
        return
    from zimage_platform.config import load_config

    base = with_engine(load_config(config_path), engine)
    size_list = parse_sizes(base, sizes, param="--sizes")
    client_list = parse_ints(clients, param="--clients")
    meta = run_meta(sys.argv[1:])
    if base.engine.backend == "simulated":
        meta["simulated"] = _simulated_meta(base, size_list)
    runs = ClosedLoopRuns(rounds, warmup, duration, max_noise, quiet_wait)
    meta |= run_benchmark(base, size_list, client_list, runs)
    meta |= {"sizes": size_list, "clients": client_list, **runs.settings(), "load_average_after": os.getloadavg()}
    report = Report(meta, runs.cells, runs.samples)
    print(report.markdown())
    write_json(json_out, report.to_json())
