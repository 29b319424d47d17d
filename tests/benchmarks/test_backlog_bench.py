"""``bench backlog``'s two cells, small: they measure what they say (no cluster needed)."""

from __future__ import annotations

import asyncio

from bench import backlog


def test_scheduler_cell_submits_on_top_of_the_backlog(tmp_path):
    row = asyncio.run(backlog._scheduler_cell(tmp_path, backlog=50, jobs=5))
    assert row["backlog"] == 50 and row["loop_cpu_ms"] > 0 and row["wall_ms"] >= row["loop_cpu_ms"] * 0.5


def test_thread_hop_cell_times_both_pools_on_a_loop_without_a_root_task():
    row = backlog._hop_cell(tasks=200, calls=20)
    assert row["tasks"] == 200 and row["anyio_us"] > 0 and row["asyncio_us"] > 0


def test_report_renders_with_verdicts():
    data = {
        "meta": {"date": "d", "command": "c", "source": "s"},
        "results": {
            "scheduler": [
                {"backlog": 0, "loop_cpu_ms": 1.0, "wall_ms": 3.0},
                {"backlog": 10, "loop_cpu_ms": 2.0, "wall_ms": 4.0},
            ],
            "thread_hop": [
                {"tasks": 0, "anyio_us": 100, "asyncio_us": 100},
                {"tasks": 9, "anyio_us": 900, "asyncio_us": 110},
            ],
        },
    }
    text = backlog.markdown(data)
    assert "**FAIL** scheduler" in text and "**PASS** asyncio.to_thread" in text and "8.2×" in text
