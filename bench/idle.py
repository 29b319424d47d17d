"""Idle benchmark: what a local platform costs while it serves nothing.

``zimage-platform serve`` on the embedded default (turbo, the real engine on the tiny checkpoint
or ``--engine simulated``), started the way a person starts it, in its own process group
(``bench.drills.ServedPlatform``). Once ``/readyz`` answers and ``--settle`` seconds have passed,
every process under it is sampled for ``--seconds``: CPU time (user + system) as a share of one
core, and resident memory at the end. Nothing is sent to it meanwhile.

Why: on a 2-core machine the platform's background (Serve's controller loop, replica health
checks and metrics, heartbeats, Ray's own daemons) is the floor every latency here sits on, and
"a local Ray started lean" is only true if each process it runs is one the platform uses.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

import typer

from bench.common import (
    MIB,
    EngineChoice,
    JsonOut,
    Render,
    log,
    machine_line,
    markdown_table,
    process_name,
    read_json,
    report_heading,
    run_meta,
    write_json,
)
from bench.drills import ServedPlatform, platform_settings
from bench.services import free_port


def sample(platform: ServedPlatform, seconds: float) -> list[dict[str, Any]]:
    """CPU share of one core and RSS of every process under ``serve`` over ``seconds``."""
    import psutil

    before: dict[int, tuple[psutil.Process, float]] = {}
    for process in platform.tree():
        try:
            times = process.cpu_times()
            before[process.pid] = (process, times.user + times.system)
        except psutil.Error:
            continue
    time.sleep(seconds)
    rows = []
    for pid, (process, start) in before.items():
        try:
            times = process.cpu_times()
            rows.append(
                {
                    "pid": pid,
                    "name": process_name(process),
                    "cpu_share": (times.user + times.system - start) / seconds,
                    "rss_bytes": process.memory_info().rss,
                }
            )
        except psutil.Error:  # it ended meanwhile: it is not part of the idle platform
            continue
    return rows


def markdown(data: dict[str, Any]) -> str:
    meta, rows = data["meta"], data["processes"]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["name"]].append(row)
    ordered = sorted(groups.items(), key=lambda item: -sum(r["cpu_share"] for r in item[1]))
    table = [
        [
            f"`{name}`",
            str(len(members)),
            f"{100 * sum(r['cpu_share'] for r in members):.1f}",
            f"{sum(r['rss_bytes'] for r in members) / MIB:.0f}",
        ]
        for name, members in ordered
    ]
    cpu = 100 * sum(r["cpu_share"] for r in rows)
    rss = sum(r["rss_bytes"] for r in rows) / MIB
    table.append(["**all**", str(len(rows)), f"**{cpu:.1f}**", f"**{rss:.0f}**"])
    lines = [
        *report_heading("Idle benchmark", meta),
        "",
        machine_line(meta),
        "",
        f"`zimage-platform serve` (embedded default, {meta['engine']} engine), ready after "
        f"{meta['ready_s']:.0f} s; sampled for {meta['seconds']:.0f} s after {meta['settle_s']:.0f} s, "
        "no requests. CPU: % of one core (user + system); RSS at the end.",
        "",
        markdown_table(["Process", "Count", "CPU %", "RSS MiB"], table),
    ]
    return "\n".join(lines)


def main(
    seconds: Annotated[float, typer.Option(min=5, help="How long the idle platform is sampled.")] = 60.0,
    settle: Annotated[float, typer.Option(min=0, help="Seconds after /readyz before sampling.")] = 30.0,
    engine: EngineChoice = "real",
    config: Annotated[Path | None, typer.Option(help="Platform config YAML (default: the embedded default).")] = None,
    json_out: JsonOut = None,
    render: Render = None,
) -> None:
    """What a local platform costs while it serves nothing: its processes, their CPU and memory."""
    if render is not None:
        print(markdown(read_json(render)))
        return
    with tempfile.TemporaryDirectory(prefix="zimage-idle-") as tmp:
        root = Path(tmp)
        platform = ServedPlatform(root, platform_settings(root, engine, config), free_port())
        try:
            log("starting `zimage-platform serve` …")
            ready_s = platform.start(timeout_s=600.0)
            log(f"ready after {ready_s:.0f} s; settling {settle:.0f} s, then sampling {seconds:.0f} s …")
            time.sleep(settle)
            processes = sample(platform, seconds)
        finally:
            platform.stop()
    meta = run_meta(sys.argv[1:], engine=engine, ready_s=ready_s, settle_s=settle, seconds=seconds)
    data = {"meta": meta, "processes": processes}
    write_json(json_out, data)
    print(markdown(data))
