"""Submit gates: a lower class's flood of submissions waits at the ingress while higher classes pass."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from zimage_platform.api.services import SubmitGates
from zimage_platform.config import ServeConfig


async def test_a_bulk_flood_waits_at_its_gate_while_realtime_passes():
    gates = SubmitGates({"bulk": 1})
    release = asyncio.Event()
    entered: list[str] = []

    async def submit(name: str, priority_class: str) -> None:
        async with gates.enter(priority_class):
            entered.append(name)
            if priority_class == "bulk":
                await release.wait()

    flood = [asyncio.create_task(submit(f"bulk{i}", "bulk")) for i in range(3)]
    await asyncio.sleep(0.01)
    await asyncio.wait_for(submit("realtime", "realtime"), timeout=1)
    assert entered == ["bulk0", "realtime"]  # one bulk submission in the write path, the rest wait
    release.set()
    await asyncio.gather(*flood)
    assert entered == ["bulk0", "realtime", "bulk1", "bulk2"]  # nothing dropped, FIFO within the class


def test_the_default_gates_leave_realtime_unlimited():
    limits = ServeConfig().submit_concurrency
    assert "realtime" not in limits and limits["bulk"] < limits["standard"]


def test_a_gate_of_zero_is_refused_at_config_load():
    """A zero gate would hold a class's submissions forever: the config refuses it, naming the field."""
    with pytest.raises(ValidationError, match=r"submit_concurrency\.bulk"):
        ServeConfig(submit_concurrency={"bulk": 0})
