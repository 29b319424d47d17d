"""Readiness from the scheduler's pool status: which variants count as servable."""

from __future__ import annotations

from zimage_platform.api.health.api_router import unserved_variants


def _pool(min_replicas: int, **capacity: int) -> dict:
    return {
        "min_replicas": min_replicas,
        "engines": {v: {"capacity": c, "inflight": 0} for v, c in capacity.items()},
    }


def test_a_variant_without_engines_is_unserved() -> None:
    pools = {"a": _pool(1, turbo=1, base=0)}
    assert unserved_variants(pools) == ["base"]


def test_a_pool_that_scales_from_zero_serves_its_variants_without_a_replica() -> None:
    """min_replicas 0: the scheduler wakes the pool when work waits, so readiness must not wait
    for a replica that only work starts (it would never come)."""
    pools = {"elastic": _pool(1, turbo=1), "zero": _pool(0, base=0)}
    assert unserved_variants(pools) == []


def test_another_pool_with_capacity_serves_the_variant() -> None:
    pools = {"a": _pool(1, turbo=0), "b": _pool(2, turbo=2)}
    assert unserved_variants(pools) == []
