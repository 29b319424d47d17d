"""Backlog benchmark: does serving one request cost more when thousands of others wait?

A flood leaves two things growing: images queued in the scheduler and requests in flight in the
ingress (waiting at a submit gate, or for their images). Every per-request step must cost the
same whatever their number; two did not (both fixed, and kept so by tests):

* ``scheduler``: the scheduler itself (``SchedulerService``, in this process, no Ray: a scratch
  SQLite job store and no engine capacity, so nothing leaves the queue) takes ``--jobs``
  submissions of 4-image bulk jobs on top of a backlog of ``--backlogs`` queued images of
  another tenant. Reported: the event loop's CPU per submission (the job INSERT runs in a
  worker thread and is not counted), and wall time per submission. Telling a 4-image job its
  queue position once scanned the whole class queue.
* ``thread hop``: a trivial blocking call handed to a worker thread, by anyio's thread pool (what
  FastAPI does for a plain ``def`` route or dependency) and by ``asyncio.to_thread`` (what the
  platform uses), with ``--tasks`` other tasks alive on an event loop run the way Ray Serve runs a
  replica's (``run_forever``, no root task anyio can find). anyio then scans every task per call.

Same run, same process: the ratios are the result, not the absolute numbers.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from bench.common import (
    JsonOut,
    Render,
    Target,
    log,
    markdown_table,
    parse_ints,
    read_json,
    report_heading,
    run_meta,
    targets_section,
    write_json,
)

#: Per-request cost at the largest backlog ÷ at none (noise allowance: these are sub-ms timings).
FLAT_TARGET = 1.5


async def _scheduler_cell(root: Path, backlog: int, jobs: int) -> dict[str, float]:
    from zimage_platform.config import load_config
    from zimage_platform.db import create_db_engine, upgrade
    from zimage_platform.scheduling.service import SchedulerService
    from zimage_platform.scheduling.store import JobStore, NewJob
    from zimage_platform.serve.runner import LocalEngineClient

    config = load_config()
    engine = create_db_engine(f"sqlite:///{root / f'jobs-{backlog}.db'}")
    upgrade(engine)
    scheduler = SchedulerService(config, JobStore(engine), LocalEngineClient({}))
    pool = scheduler.dispatcher.pool_of("bulk")
    scheduler.set_capacity(pool, "turbo", 0)  # no engine: everything stays queued
    await scheduler.start()
    params = {"prompt": "catalogue", "size": "64x64", "steps": 8, "guidance": 0.0, "sampler": "euler", "shift": 3.0}

    def job(tenant: str, n: int) -> NewJob:
        return NewJob(tenant, "turbo", "text2img", dict(params), list(range(n)), priority_class="bulk", plan="bulk")

    try:
        if backlog:
            first, _ = await scheduler.submit(job("backlog", 1))
            item = next(iter(scheduler.dispatcher.queues[pool]._jobs[first.id].values()))
            for index in range(1, backlog):
                scheduler.dispatcher.submit(replace(item, index=index))
        cpu, wall = [], []
        for _ in range(jobs):
            started_cpu, started = time.thread_time(), time.perf_counter()
            await scheduler.submit(job("measured", 4))
            cpu.append(time.thread_time() - started_cpu)
            wall.append(time.perf_counter() - started)
        assert len(scheduler.dispatcher.queues[pool]) == backlog + 4 * jobs
    finally:
        await scheduler.stop(grace_s=0)
        engine.dispose()
    return {"backlog": backlog, "loop_cpu_ms": statistics.median(cpu) * 1e3, "wall_ms": statistics.median(wall) * 1e3}


def _hop_cell(tasks: int, calls: int) -> dict[str, float]:
    """Per-call time of both thread hops with ``tasks`` idle tasks, on a ``run_forever`` loop."""
    import anyio.to_thread

    async def measure() -> dict[str, float]:
        idle = asyncio.Event()
        waiting = [asyncio.ensure_future(idle.wait()) for _ in range(tasks)]
        await asyncio.sleep(0)
        result = {}
        for name, hop in (("anyio_us", anyio.to_thread.run_sync), ("asyncio_us", asyncio.to_thread)):
            await hop(time.perf_counter)  # the pool's first thread
            started = time.perf_counter()
            for _ in range(calls):
                await hop(time.perf_counter)
            result[name] = (time.perf_counter() - started) / calls * 1e6
        idle.set()
        await asyncio.gather(*waiting)
        return result

    loop = asyncio.new_event_loop()
    try:
        outcome: dict[str, Any] = {}

        async def main() -> None:
            outcome.update(await measure())

        task = loop.create_task(main())
        task.add_done_callback(lambda _: loop.stop())
        loop.run_forever()  # as Ray Serve runs a replica's loop: no run_until_complete root task
        task.result()
    finally:
        loop.close()
    return {"tasks": tasks, **outcome}


def _flat(name: str, first: float, last: float) -> Target:
    return Target(name, last / first, FLAT_TARGET, "≤", unit="×")


def summarize(results: dict[str, Any]) -> list[Target]:
    sched, hops = results["scheduler"], results["thread_hop"]
    return [
        _flat(
            f"scheduler: loop CPU per submission at {sched[-1]['backlog']:,} queued ÷ at {sched[0]['backlog']:,}",
            sched[0]["loop_cpu_ms"],
            sched[-1]["loop_cpu_ms"],
        ),
        _flat(
            f"asyncio.to_thread per call with {hops[-1]['tasks']:,} tasks alive ÷ with {hops[0]['tasks']:,}",
            hops[0]["asyncio_us"],
            hops[-1]["asyncio_us"],
        ),
    ]


def markdown(data: dict[str, Any]) -> str:
    meta, results = data["meta"], data["results"]
    lines = report_heading("Backlog benchmark", meta)
    lines += [
        "Scheduler submissions (4-image bulk jobs) on top of a backlog of another tenant's queued images (medians):",
        "",
        markdown_table(
            ["Queued images", "Event-loop CPU ms per submission", "Wall ms per submission"],
            [[f"{r['backlog']:,}", f"{r['loop_cpu_ms']:.3f}", f"{r['wall_ms']:.2f}"] for r in results["scheduler"]],
        ),
        "",
        "A trivial call handed to a worker thread, with other tasks alive on a `run_forever` loop (µs per call):",
        "",
        markdown_table(
            [
                "Tasks alive",
                "anyio thread pool (FastAPI's `def`)",
                "asyncio.to_thread (the platform's)",
                "anyio ÷ asyncio",
            ],
            [
                [
                    f"{r['tasks']:,}",
                    f"{r['anyio_us']:.0f}",
                    f"{r['asyncio_us']:.0f}",
                    f"{r['anyio_us'] / r['asyncio_us']:.1f}×",
                ]
                for r in results["thread_hop"]
            ],
        ),
        "",
        *targets_section(summarize(results)),
    ]
    return "\n".join(lines)


def main(
    backlogs: Annotated[str, typer.Option(help="Queued images before the measured submissions.")] = "0,1000,10000",
    jobs: Annotated[int, typer.Option(min=5, help="Measured submissions per backlog.")] = 200,
    tasks: Annotated[str, typer.Option(help="Idle tasks alive on the loop during the thread hops.")] = "0,1000,5000",
    calls: Annotated[int, typer.Option(min=10, help="Thread hops per kind and task count.")] = 500,
    json_out: JsonOut = None,
    render: Render = None,
) -> None:
    """Does one request cost more while thousands wait (scheduler queue, tasks on the loop)?"""
    if render is not None:
        print(markdown(read_json(render)))
        return
    sizes = parse_ints(backlogs, param="--backlogs", minimum=0)
    counts = parse_ints(tasks, param="--tasks", minimum=0)
    scheduler_rows = []
    with tempfile.TemporaryDirectory(prefix="zimage-backlog-") as tmp:
        for backlog in sizes:
            log(f"scheduler: {jobs} submissions on {backlog:,} queued images …")
            scheduler_rows.append(asyncio.run(_scheduler_cell(Path(tmp), backlog, jobs)))
    hop_rows = []
    for count in counts:
        log(f"thread hops with {count:,} tasks alive …")
        hop_rows.append(_hop_cell(count, calls))
    data = {
        "meta": run_meta(sys.argv[1:], jobs=jobs, calls=calls),
        "results": {"scheduler": scheduler_rows, "thread_hop": hop_rows},
    }
    write_json(json_out, data)
    print(markdown(data))
