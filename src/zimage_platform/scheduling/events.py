"""Per-job event history and live subscribers (SSE streams, sync waiters, ComfyUI websockets)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

TERMINAL_EVENTS = frozenset({"succeeded", "failed", "cancelled"})


@dataclass
class JobEvent:
    seq: int
    type: str  # queued | started | progress | succeeded | failed | cancelled
    job_id: str
    data: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)
    #: The job as stored when it reached this (terminal) state: in-process waiters need no read.
    row: Any = field(default=None, repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": self.type, "job_id": self.job_id, "at": self.at, **self.data}


class EventHub:
    """Keeps the last events of recent jobs; subscribers get history then live events."""

    def __init__(self, max_jobs: int = 10_000, max_events_per_job: int = 256) -> None:
        self._history: OrderedDict[str, list[JobEvent]] = OrderedDict()
        self._subscribers: dict[str, set[asyncio.Queue[JobEvent]]] = {}
        self.max_jobs = max_jobs
        self.max_events = max_events_per_job

    def publish(self, job_id: str, type_: str, row: Any = None, **data: Any) -> JobEvent:
        events = self._history.get(job_id)
        if events is None:
            events = self._history[job_id] = []
            while len(self._history) > self.max_jobs:
                self._history.popitem(last=False)
        event = JobEvent(seq=(events[-1].seq + 1) if events else 1, type=type_, job_id=job_id, data=data, row=row)
        # Progress events are superseded by later ones; keep terminal and lifecycle events.
        if len(events) >= self.max_events and events[-1].type == "progress":
            events.pop()
        events.append(event)
        for queue in self._subscribers.get(job_id, ()):
            queue.put_nowait(event)
        return event

    def history(self, job_id: str) -> list[JobEvent]:
        return list(self._history.get(job_id, ()))

    async def subscribe(self, job_id: str, *, after: int = 0) -> AsyncIterator[JobEvent]:
        """History after ``after``, then live events until a terminal one."""
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._subscribers.setdefault(job_id, set()).add(queue)
        try:
            for event in self.history(job_id):
                if event.seq > after:
                    yield event
                    after = event.seq
                    if event.terminal:
                        return
            while True:
                event = await queue.get()
                if event.seq <= after:
                    continue
                yield event
                after = event.seq
                if event.terminal:
                    return
        finally:
            subscribers = self._subscribers.get(job_id)
            if subscribers is not None:
                subscribers.discard(queue)
                if not subscribers:
                    del self._subscribers[job_id]
