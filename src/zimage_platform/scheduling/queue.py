"""A pool's queue: strict priority by class, FIFO within a class, batch merging by key.

Plain Python with an injected clock, so the same code runs in the Serve app, in unit tests and
in the capacity simulator (millions of requests). Every operation costs O(keys × classes) or
O(log n) — never O(queue length): removals (deadlines, cancellation, a finished job) are lazy
(the entry is marked dead and skipped when it reaches a group's head), and counts are kept per
class, per key, per (class, tenant) and per job.

Picking the next batch:
1. Every (class, key) group's oldest item is a candidate; candidates are ordered by class
   (an item of the lowest class older than ``starvation_s`` counts as the highest), then age.
2. The first candidate's key is the batch. It leaves when full, when its oldest item has waited
   ``max_wait``, or at once if any other group is ready — merging must never let lower-priority
   work take the capacity first.
3. The batch is filled with that key's items: the leader first, then by class, FIFO.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Collection, Iterable

from zimage_platform.scheduling.work import PRIORITY_CLASSES, WorkItem, WorkKey

#: A queue entry: the token the item had when it was added (a stale entry's token differs).
_Entry = tuple[int, WorkItem]


def _alive(token: int, item: WorkItem) -> bool:
    return item.queued and item.queue_token == token


class PoolQueue:
    def __init__(self, classes: Iterable[str] = PRIORITY_CLASSES, *, starvation_s: float | None = None) -> None:
        self.classes: tuple[str, ...] = tuple(classes)
        self.starvation_s = starvation_s
        #: class → key → entries in arrival order; a group exists while it has a live item.
        self._groups: dict[str, dict[WorkKey, deque[_Entry]]] = {c: {} for c in self.classes}
        self._live: dict[str, dict[WorkKey, int]] = {c: {} for c in self.classes}
        self._counts: dict[str, int] = dict.fromkeys(self.classes, 0)
        self._total = 0
        self._key_counts: dict[WorkKey, int] = {}
        #: (class, tenant) → queued items: a tenant's share of a class queue is checked per submission.
        self._tenant_counts: dict[tuple[str, str], int] = {}
        #: job id → queue token → queued item (cancellation and lookups without a scan).
        self._jobs: dict[str, dict[int, WorkItem]] = {}
        self._deadlines: list[tuple[float, int, WorkItem]] = []
        self._seq = itertools.count()

    # -- contents -----------------------------------------------------------------------

    def add(self, item: WorkItem) -> None:
        cls, key = item.priority, item.key
        token = next(self._seq)
        item.queue_token = token
        item.queued = True
        groups = self._groups[cls]
        group = groups.get(key)
        if group is None:
            group = groups[key] = deque()
            self._live[cls][key] = 0
        group.append((token, item))
        self._live[cls][key] += 1
        self._counts[cls] += 1
        self._total += 1
        self._key_counts[key] = self._key_counts.get(key, 0) + 1
        owner = (cls, item.tenant_id)
        self._tenant_counts[owner] = self._tenant_counts.get(owner, 0) + 1
        self._jobs.setdefault(item.job_id, {})[token] = item
        if item.deadline is not None:
            heapq.heappush(self._deadlines, (item.deadline, token, item))

    def __len__(self) -> int:
        return self._total

    def depth(self, cls: str) -> int:
        return self._counts.get(cls, 0)

    def tenant_depth(self, cls: str, tenant_id: str) -> int:
        """Queued items of one tenant in class ``cls``."""
        return self._tenant_counts.get((cls, tenant_id), 0)

    def depths(self) -> dict[str, int]:
        return dict(self._counts)

    def count(self, key: WorkKey) -> int:
        """Queued items with this key, all classes."""
        return self._key_counts.get(key, 0)

    def key_counts(self) -> dict[WorkKey, int]:
        return dict(self._key_counts)

    def oldest(self, cls: str) -> float | None:
        heads = [self._head(group).enqueued_at for group in self._groups[cls].values()]
        return min(heads) if heads else None

    def remove_job(self, job_id: str) -> list[WorkItem]:
        """Take a job's queued items out (cancelled, failed or finished): O(its items)."""
        items = list(self._jobs.get(job_id, {}).values())
        for item in items:
            self._forget(item)
        return items

    def expire(self, now: float) -> list[WorkItem]:
        """Remove items past their deadline (a heap: O(expired · log n))."""
        expired: list[WorkItem] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, token, item = heapq.heappop(self._deadlines)
            if _alive(token, item):
                self._forget(item)
                expired.append(item)
        return expired

    def earliest_deadline(self) -> float | None:
        while self._deadlines and not _alive(self._deadlines[0][1], self._deadlines[0][2]):
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def ahead_of_arrival(self, cls: str) -> int:
        """Items a new arrival of class ``cls`` queues behind (for "queued, position N" events):
        every item of a higher class and every queued item of its own (each arrived before it).
        O(classes): asked on every submission, whatever the backlog."""
        ahead = 0
        for c in self.classes:
            ahead += self._counts[c]
            if c == cls:
                break
        return ahead

    # -- batching -----------------------------------------------------------------------

    def _rank(self, cls_index: int, head: WorkItem, now: float) -> int:
        if (
            self.starvation_s is not None
            and cls_index == len(self.classes) - 1
            and now - head.enqueued_at >= self.starvation_s
        ):
            return -1
        return cls_index

    def next_batch(
        self,
        now: float,
        *,
        max_batch: Callable[[WorkKey], int],
        max_wait: Callable[[WorkKey], float],
        variants: Collection[str] | None = None,
    ) -> tuple[list[WorkItem] | None, float | None]:
        """``(items, None)`` to dispatch now, or ``(None, wake_at)``: when to look again
        (``None`` when nothing is queued for ``variants``)."""
        candidates: list[tuple[int, float, WorkKey, WorkItem]] = []
        for ci, cls in enumerate(self.classes):
            for key, group in self._groups[cls].items():
                if variants is None or key.variant in variants:
                    head = self._head(group)
                    candidates.append((self._rank(ci, head, now), head.enqueued_at, key, head))
        if not candidates:
            return None, None
        if len(candidates) > 1:
            candidates.sort(key=lambda c: (c[0], c[1]))
        _, leader_at, key, leader = candidates[0]
        limit = max_batch(key)
        # ``now >= at + wait`` (not ``now - at >= wait``): the same sum as the wake-up time below,
        # so a loop woken at exactly that time (a simulated clock) finds the batch due.
        if self._key_counts[key] >= limit or now >= leader_at + max_wait(key):
            return self._take(key, leader, limit), None
        for _, head_at, other, _ in candidates[1:]:
            if self._key_counts[other] >= max_batch(other) or now >= head_at + max_wait(other):
                return self._take(key, leader, limit), None
        return None, min(at + max_wait(k) for _, at, k, _ in candidates)

    # -- internals ----------------------------------------------------------------------

    @staticmethod
    def _head(group: deque[_Entry]) -> WorkItem:
        """The group's oldest live item; dead entries in front of it are dropped on the way."""
        while True:
            token, item = group[0]
            if _alive(token, item):
                return item
            group.popleft()

    def _take(self, key: WorkKey, leader: WorkItem, limit: int) -> list[WorkItem]:
        batch = [self._pop(leader.priority, key)]
        for cls in self.classes:
            while len(batch) < limit and key in self._groups[cls]:
                batch.append(self._pop(cls, key))
            if len(batch) >= limit:
                break
        return batch

    def _pop(self, cls: str, key: WorkKey) -> WorkItem:
        item = self._head(self._groups[cls][key])
        self._groups[cls][key].popleft()
        self._forget(item)
        return item

    def _forget(self, item: WorkItem) -> None:
        """Take a queued item out of the counts; its entry is dropped when it reaches a head."""
        cls, key = item.priority, item.key
        item.queued = False
        live = self._live[cls]
        live[key] -= 1
        if not live[key]:
            del live[key]
            del self._groups[cls][key]  # any dead entries left go with it
        self._counts[cls] -= 1
        self._total -= 1
        remaining = self._key_counts[key] - 1
        if remaining:
            self._key_counts[key] = remaining
        else:
            del self._key_counts[key]
        owner = (cls, item.tenant_id)
        if self._tenant_counts[owner] > 1:
            self._tenant_counts[owner] -= 1
        else:
            del self._tenant_counts[owner]
        job = self._jobs[item.job_id]
        del job[item.queue_token]
        if not job:
            del self._jobs[item.job_id]
