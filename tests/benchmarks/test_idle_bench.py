"""``python -m bench idle`` without a platform: the sampler against real processes (one spinning,
one asleep) and the report's grouping by process name."""

from __future__ import annotations

import subprocess
import sys

import psutil
from bench.idle import markdown, sample


class Tree:
    """Stands in for ``ServedPlatform``: the sampler only asks for the processes under it."""

    def __init__(self, processes: list[subprocess.Popen]) -> None:
        self.processes = processes

    def tree(self) -> list[psutil.Process]:
        return [psutil.Process(p.pid) for p in self.processes]


def test_the_sampler_tells_a_busy_process_from_an_idle_one():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rows = {row["pid"]: row for row in sample(Tree([busy, idle]), seconds=1.5)}
    finally:
        for process in (busy, idle):
            process.kill()
            process.wait()
    assert rows[busy.pid]["cpu_share"] > 0.3  # a core shared with the rest of the suite at worst
    assert rows[idle.pid]["cpu_share"] < 0.05
    assert all(row["rss_bytes"] > 1024 * 1024 for row in rows.values())


def test_the_report_groups_processes_by_name_and_totals_them():
    meta = {
        "date": "2026-12-03 16:00 UTC",
        "command": "python -m bench idle",
        "source": "abc1234",
        "machine": "test machine",
        "python": "3.11",
        "versions": {"ray": "2.60.0"},
        "engine": "real",
        "ready_s": 40.0,
        "settle_s": 30.0,
        "seconds": 60.0,
    }
    mib = 1024 * 1024
    processes = [
        {"pid": 1, "name": "ray::IDLE", "cpu_share": 0.01, "rss_bytes": 100 * mib},
        {"pid": 2, "name": "ray::IDLE", "cpu_share": 0.02, "rss_bytes": 100 * mib},
        {"pid": 3, "name": "ray::ServeController", "cpu_share": 0.05, "rss_bytes": 200 * mib},
    ]
    text = markdown({"meta": meta, "processes": processes})
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| `ray::ServeController` | 1 | 5.0 | 200 |")  # busiest first
    assert lines[2].startswith("| `ray::IDLE` | 2 | 3.0 | 200 |")
    assert lines[3] == "| **all** | 3 | **8.0** | **400** |"
