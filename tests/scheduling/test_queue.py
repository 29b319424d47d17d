"""Priority queues, batch merging and dispatch: plain Python, driven by a fake clock."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from zimage_platform.config import PoolConfig
from zimage_platform.scheduling.dispatcher import Dispatcher, PoolPolicy, pool_policies
from zimage_platform.scheduling.queue import PoolQueue
from zimage_platform.scheduling.work import WorkItem, WorkKey

K64 = WorkKey("turbo", "64x64", 8, False, "euler", 3.0, None, None)
K128 = K64._replace(size="128x128")
KBASE = K64._replace(variant="base", cfg=True, steps=28)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def item(job: str, at: float, priority: str = "standard", key: WorkKey = K64, index: int = 0, deadline=None):
    return WorkItem(
        job_id=job,
        index=index,
        tenant_id="t",
        priority=priority,
        key=key,
        seed=index,
        prompt=job,
        negative_prompt="",
        guidance=0.0,
        input_key=None,
        created_at=NOW,
        enqueued_at=at,
        deadline=deadline,
    )


def batch_of(q: PoolQueue, now: float, max_batch: int = 4, wait: float = 0.05, variants=None):
    return q.next_batch(now, max_batch=lambda k: max_batch, max_wait=lambda k: wait, variants=variants)


def ids(items) -> list[str]:
    return [i.job_id for i in items]


def test_a_full_batch_leaves_at_once_in_fifo_order():
    q = PoolQueue()
    for n in range(5):
        q.add(item(f"j{n}", at=n * 0.001))
    items, _ = batch_of(q, now=0.005)
    assert ids(items) == ["j0", "j1", "j2", "j3"] and len(q) == 1


def test_a_partial_batch_waits_for_max_wait_then_leaves():
    q = PoolQueue()
    q.add(item("a", at=0.0))
    items, wake = batch_of(q, now=0.01, wait=0.05)
    assert items is None and wake == 0.05
    q.add(item("b", at=0.02))
    items, _ = batch_of(q, now=0.05)
    assert ids(items) == ["a", "b"]


def test_only_compatible_requests_merge():
    q = PoolQueue()
    q.add(item("small", at=0.0, key=K64))
    q.add(item("big", at=0.001, key=K128))
    q.add(item("small2", at=0.002, key=K64))
    items, _ = batch_of(q, now=1.0)
    assert ids(items) == ["small", "small2"] and {i.key for i in items} == {K64}


def test_higher_class_goes_first_even_if_it_arrived_later():
    q = PoolQueue()
    q.add(item("bulk", at=0.0, priority="bulk", key=K128))
    q.add(item("rt", at=0.5, priority="realtime"))
    items, _ = batch_of(q, now=1.0)
    assert ids(items) == ["rt"]


def test_merging_never_lets_lower_work_jump_ahead():
    """A realtime item still waiting to fill its batch leaves at once when bulk work is ready."""
    q = PoolQueue()
    for n in range(4):
        q.add(item(f"bulk{n}", at=0.0, priority="bulk", key=K128))
    q.add(item("rt", at=0.0, priority="realtime"))
    items, _ = batch_of(q, now=0.001)  # rt has not waited max_wait, but bulk is full
    assert ids(items) == ["rt"]


def test_lower_classes_fill_a_batch_led_by_a_higher_one():
    q = PoolQueue()
    q.add(item("rt", at=0.1, priority="realtime"))
    q.add(item("std", at=0.0, priority="standard"))
    q.add(item("bulk", at=0.0, priority="bulk"))
    items, _ = batch_of(q, now=1.0)
    assert ids(items) == ["rt", "std", "bulk"]


def test_starving_bulk_work_is_served_first():
    q = PoolQueue(starvation_s=10.0)
    q.add(item("old-bulk", at=0.0, priority="bulk", key=K128))
    for n in range(5):
        q.add(item(f"std{n}", at=9.0 + n * 0.1, priority="standard"))
    items, _ = batch_of(q, now=9.5)
    assert ids(items) == ["std0", "std1", "std2", "std3"]  # bulk is not starving yet
    items, _ = batch_of(q, now=10.5)
    assert ids(items) == ["old-bulk"]


def test_starving_leader_is_in_its_batch_even_if_higher_classes_could_fill_it():
    q = PoolQueue(starvation_s=10.0)
    q.add(item("old-bulk", at=0.0, priority="bulk"))
    for n in range(4):
        q.add(item(f"std{n}", at=10.0, priority="standard"))
    items, _ = batch_of(q, now=10.5)
    assert ids(items) == ["old-bulk", "std0", "std1", "std2"]


def test_deadlines_and_cancellation_remove_items():
    q = PoolQueue()
    q.add(item("late", at=0.0, deadline=1.0))
    q.add(item("fine", at=0.0, deadline=100.0))
    q.add(item("gone", at=0.0, index=0))
    q.add(item("gone", at=0.0, index=1))
    assert ids(q.expire(now=2.0)) == ["late"]
    assert [i.index for i in q.remove_job("gone")] == [0, 1]
    assert len(q) == 1 and q.depth("standard") == 1
    assert q.ahead_of_arrival("standard") == 1 and q.ahead_of_arrival("realtime") == 0


def pools(max_batch: int = 4, wait: float = 0.0) -> list[PoolPolicy]:
    return [
        PoolPolicy("rt", ("realtime",), ("turbo",), lambda k: wait, lambda k: max_batch),
        PoolPolicy("std", ("standard",), ("turbo", "base"), lambda k: wait, lambda k: max_batch),
        PoolPolicy("bulk", ("bulk",), ("turbo",), lambda k: wait, lambda k: max_batch),
    ]


def test_dispatch_respects_capacity_and_is_late_bound():
    d = Dispatcher(pools())
    d.set_capacity("std", "turbo", 1)
    for n in range(3):
        d.submit(item(f"s{n}", at=0.0))
    first, _ = d.next_batch(now=0.0)
    assert ids(first.items) == ["s0", "s1", "s2"] and first.pool == "std"
    d.submit(item("s3", at=0.1))
    assert d.next_batch(now=0.2) == (None, None)  # no free engine: nothing is formed early
    d.done(first)
    second, _ = d.next_batch(now=0.2)
    assert ids(second.items) == ["s3"]


def test_each_batch_is_placed_on_a_replica_whose_engine_is_free():
    """Serve's router sees a replica storing its last batch's images (engine free) and one whose
    engine runs a batch as equally busy; the dispatcher does not: a batch goes to the replica
    with the most free engine slots, and a released engine takes the next batch at once."""
    d = Dispatcher(pools())
    d.set_replicas("std", "turbo", {"a": 1, "b": 1})
    assert d.capacity[("std", "turbo")] == 2
    placed = []
    for n in range(2):
        d.submit(item(f"s{n}", at=0.0))
        batch, _ = d.next_batch(now=0.0)
        placed.append(batch)
    assert [b.replica for b in placed] == ["a", "b"]
    d.done(placed[0])  # a's engine is free; a still stores the batch's images (Serve counts it)
    d.submit(item("s2", at=0.1))
    third, _ = d.next_batch(now=0.1)
    assert third.replica == "a"  # not b, whose engine is still busy
    d.set_replicas("std", "turbo", {"a": 1, "b": 1, "c": 2})  # a new replica with two slots
    d.submit(item("s3", at=0.2, key=K128))
    d.submit(item("s4", at=0.2))
    fourth, _ = d.next_batch(now=0.2)
    fifth, _ = d.next_batch(now=0.2)
    assert (fourth.replica, fifth.replica) == ("c", "c")
    assert d.held[("std", "turbo")] == {"a": 1, "b": 1, "c": 2}
    d.set_capacity("std", "base", 1)  # replicas not known one by one: Serve's router chooses
    d.submit(item("base", at=0.3, key=KBASE))
    unplaced, _ = d.next_batch(now=0.3)
    assert unplaced.variant == "base" and unplaced.replica is None


def test_idle_higher_pool_borrows_lower_work_but_not_while_its_own_class_waits():
    d = Dispatcher(pools())
    d.set_capacity("rt", "turbo", 1)
    d.set_capacity("bulk", "turbo", 1)
    for n in range(8):
        d.submit(item(f"b{n}", at=0.0, priority="bulk"))
    own, _ = d.next_batch(now=0.0)
    borrowed, _ = d.next_batch(now=0.0)
    assert own.pool == "bulk" and borrowed.pool == "rt" and borrowed.source_pool == "bulk"
    d.done(borrowed)
    d.submit(item("rt1", at=0.1, priority="realtime"))
    d.submit(item("b8", at=0.1, priority="bulk"))
    nxt, _ = d.next_batch(now=0.1)
    assert ids(nxt.items) == ["rt1"] and nxt.pool == "rt"


def test_a_lending_pool_caps_borrowed_batches_but_not_its_own():
    """``lend_max_batch``: a realtime engine on loan runs short bulk batches, so a realtime
    arrival waits behind at most one of them; its own work still gets the full batch."""
    rt, std, bulk = pools(max_batch=4)
    rt = replace(rt, lend_batch=lambda k: 1)
    d = Dispatcher([rt, std, bulk])
    d.set_capacity("rt", "turbo", 1)
    for n in range(8):
        d.submit(item(f"b{n}", at=0.0, priority="bulk"))
    borrowed, _ = d.next_batch(now=0.0)
    assert borrowed.pool == "rt" and borrowed.source_pool == "bulk" and ids(borrowed.items) == ["b0"]
    d.done(borrowed)
    for n in range(3):
        d.submit(item(f"r{n}", at=0.1, priority="realtime"))
    own, _ = d.next_batch(now=0.1)
    assert own.pool == "rt" and ids(own.items) == ["r0", "r1", "r2"]


def test_pool_policies_read_lend_caps_from_the_config(config):
    pools_cfg = {
        "rt": PoolConfig(classes=["realtime"], variants=["turbo"], lend_max_batch={"default": 1}),
        "rest": PoolConfig(classes=["standard", "bulk"], variants=["turbo"]),
    }
    policies = {p.name: p for p in pool_policies(config.model_copy(update={"pools": pools_cfg}))}
    assert policies["rt"].lend_batch(K64) == 1 and policies["rt"].max_batch(K64) > 1
    assert policies["rest"].lend_batch is None


def test_variants_only_run_where_an_engine_exists():
    d = Dispatcher(pools())
    d.set_capacity("std", "turbo", 1)
    d.submit(item("needs-base", at=0.0, key=KBASE))
    assert d.next_batch(now=1.0)[0] is None
    d.set_capacity("std", "base", 1)
    batch, _ = d.next_batch(now=1.0)
    assert batch.variant == "base"


def test_an_idle_engine_starts_at_once_and_a_busy_one_waits_to_merge():
    """The merge wait is only worth paying while the engine already runs a batch (continuous
    batching): a lone request on an idle engine leaves at once."""
    d = Dispatcher(pools(wait=0.05))
    d.set_capacity("std", "turbo", 2)
    d.submit(item("alone", at=0.0))
    first, _ = d.next_batch(now=0.0)
    assert first is not None and ids(first.items) == ["alone"]
    d.submit(item("a", at=0.01))
    batch, wake_at = d.next_batch(now=0.02)  # one slot free, but one batch in flight: merge
    assert batch is None and abs(wake_at - 0.06) < 1e-9
    d.submit(item("b", at=0.03))
    second, _ = d.next_batch(now=wake_at)
    assert ids(second.items) == ["a", "b"]
