"""MIG inventory → pool plan: what the GPU nodes offer, and pool sizes (Helm values) that fit.

The NVIDIA GPU operator publishes MIG slices as node resources: with the ``mixed`` strategy one
resource per profile (``nvidia.com/mig-3g.40gb: 2``); with ``single`` every slice is an
``nvidia.com/gpu`` and the profile is in the product label (``NVIDIA-H800-MIG-1g.10gb``). GPU
feature discovery adds labels (``nvidia.com/gpu.product``, ``nvidia.com/mig.config`` — the
layout the MIG manager applied — and ``nvidia.com/mig.config.state``). Only nodes that are
Ready, schedulable and not in the middle of a MIG reconfiguration count.

A pool's replicas each hold one slice of the pool's MIG profile (a pool without one but with
``num_gpus`` holds whole GPUs); the chart gives each pool a worker group whose pods request one
slice each. Pools sharing a profile split its slices in proportion to their configured maxima.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

MIG_RESOURCE = "nvidia.com/mig-"
GPU_RESOURCE = "nvidia.com/gpu"
PRODUCT_LABEL = "nvidia.com/gpu.product"
MIG_CONFIG_LABEL = "nvidia.com/mig.config"
MIG_STATE_LABEL = "nvidia.com/mig.config.state"
MIG_STRATEGY_LABEL = "nvidia.com/mig.strategy"
#: The slice "profile" name for a whole GPU.
WHOLE_GPU = "gpu"
_SINGLE_PRODUCT = re.compile(r"-MIG-(\d+g\.\d+gb)$")


def _count(quantity: Any) -> int:
    """Extended resources are whole numbers (``"2"``)."""
    try:
        return int(str(quantity))
    except ValueError:
        return 0


@dataclass
class NodeGpus:
    name: str
    product: str | None
    mig_config: str | None
    mig_state: str | None
    strategy: str | None
    #: Allocatable slices per profile (``gpu``: whole GPUs).
    slices: dict[str, int]
    #: Why the node does not count (``None``: it does).
    excluded: str | None = None


def node_gpus(node: dict[str, Any]) -> NodeGpus:
    """One Node object (as the API returns it) → its GPU slices."""
    meta, spec, status = node.get("metadata", {}), node.get("spec") or {}, node.get("status") or {}
    labels = meta.get("labels") or {}
    allocatable = status.get("allocatable") or {}
    product = labels.get(PRODUCT_LABEL)
    slices: dict[str, int] = {}
    for resource, quantity in allocatable.items():
        if resource.startswith(MIG_RESOURCE) and _count(quantity):
            slices[resource[len(MIG_RESOURCE) :]] = _count(quantity)
    gpus = _count(allocatable.get(GPU_RESOURCE, 0))
    if gpus:
        single = _SINGLE_PRODUCT.search(product or "")
        profile = single.group(1) if single else WHOLE_GPU
        slices[profile] = slices.get(profile, 0) + gpus
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    state = labels.get(MIG_STATE_LABEL)
    excluded = None
    if spec.get("unschedulable"):
        excluded = "cordoned"
    elif not ready:
        excluded = "not Ready"
    elif state not in (None, "success"):
        excluded = f"MIG reconfiguration {state}"
    return NodeGpus(
        name=meta.get("name", "?"),
        product=product,
        mig_config=labels.get(MIG_CONFIG_LABEL),
        mig_state=state,
        strategy=labels.get(MIG_STRATEGY_LABEL),
        slices=slices,
        excluded=excluded,
    )


@dataclass
class PoolPlan:
    pool: str
    profile: str | None
    variants: list[str]
    #: Slices of the profile this pool may use.
    slices: int
    #: Proposed Serve autoscaling per engine deployment (the config's, cut down to fit).
    min_replicas: int
    max_replicas: int
    #: The pool's worker group: pods of one slice each.
    group_min: int
    group_max: int
    configured: tuple[int, int]
    notes: list[str] = field(default_factory=list)


@dataclass
class MigPlan:
    nodes: list[NodeGpus]
    available: dict[str, int]
    pools: list[PoolPlan]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def pool_profile(config: PlatformConfig, pool: str) -> str | None:
    cfg = config.pools[pool]
    if cfg.mig_profile:
        return cfg.mig_profile
    return WHOLE_GPU if cfg.num_gpus > 0 else None


def plan_pools(config: PlatformConfig, nodes: list[NodeGpus]) -> MigPlan:
    """Pool sizes that fit the slices the schedulable nodes offer."""
    warnings: list[str] = []
    available: dict[str, int] = {}
    for node in nodes:
        if node.excluded:
            if node.slices:
                warnings.append(f"node {node.name} not counted: {node.excluded}")
            continue
        for profile, n in node.slices.items():
            available[profile] = available.get(profile, 0) + n
    layouts = {n.mig_config for n in nodes if n.slices and not n.excluded}
    if len(layouts) > 1:
        warnings.append(f"GPU nodes use different MIG layouts: {sorted(str(x) for x in layouts)}")
    by_profile: dict[str, list[str]] = {}
    for pool in config.pools:
        profile = pool_profile(config, pool)
        if profile is not None:
            by_profile.setdefault(profile, []).append(pool)
    plans: list[PoolPlan] = []
    for pool in config.pools:
        cfg, variants = config.pools[pool], config.pool_variants(pool)
        scaling, profile = cfg.autoscaling, pool_profile(config, pool)
        configured = (scaling.min_replicas, scaling.max_replicas)
        if profile is None:
            plans.append(
                PoolPlan(pool, None, variants, 0, *configured, 0, 0, configured, ["CPU pool: no GPU slices needed"])
            )
            continue
        sharing = by_profile[profile]
        weight = {p: config.pools[p].autoscaling.max_replicas * len(config.pool_variants(p)) for p in sharing}
        total = available.get(profile, 0)
        slices = total if len(sharing) == 1 else math.floor(total * weight[pool] / sum(weight.values()))
        notes = [] if len(sharing) == 1 else [f"shares {profile} with {', '.join(p for p in sharing if p != pool)}"]
        # Every variant deployment of the pool scales on its own, on the pool's slices.
        max_replicas = min(scaling.max_replicas, slices)
        min_replicas = min(scaling.min_replicas, slices // max(len(variants), 1))
        if not slices:
            warnings.append(f"pool {pool}: no schedulable {profile} slices on any node")
        elif min_replicas < scaling.min_replicas:
            notes.append(
                f"min_replicas cut from {scaling.min_replicas} to {min_replicas}: "
                f"{len(variants)} deployments × min must fit {slices} slices"
            )
        if slices and max_replicas < scaling.max_replicas:
            notes.append(f"max_replicas cut from {scaling.max_replicas} to {max_replicas} (slices available)")
        plans.append(
            PoolPlan(
                pool=pool,
                profile=profile,
                variants=variants,
                slices=slices,
                min_replicas=min_replicas,
                max_replicas=max(max_replicas, min_replicas, 1),
                group_min=min_replicas * len(variants),
                group_max=max(slices, 1),
                configured=configured,
                notes=notes,
            )
        )
    return MigPlan(nodes=nodes, available=dict(sorted(available.items())), pools=plans, warnings=warnings)


def values_snippet(plan: MigPlan) -> dict[str, Any]:
    """The Helm values (chart ``platform.pools`` and ``workerGroups``) for the plan."""
    pools: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for p in plan.pools:
        if p.profile is None:
            continue
        pools[p.pool] = {"autoscaling": {"min_replicas": p.min_replicas, "max_replicas": p.max_replicas}}
        group: dict[str, Any] = {"pool": p.pool}
        if p.profile != WHOLE_GPU:
            group["migProfile"] = p.profile
        group.update({"replicas": p.group_min, "minReplicas": p.group_min, "maxReplicas": p.group_max})
        groups[p.pool] = group
    return {"platform": {"pools": pools}, "workerGroups": groups}


def render_plan(plan: MigPlan) -> str:
    """The plan as YAML with the reasoning as comments (paste the values into a values file)."""
    import yaml

    lines = ["# zimage-platform ops mig-plan", "# slices on schedulable nodes:"]
    for profile, n in plan.available.items():
        lines.append(f"#   {profile}: {n}")
    for node in plan.nodes:
        if node.slices:
            state = f" — not counted: {node.excluded}" if node.excluded else ""
            slices = ", ".join(f"{k}={v}" for k, v in sorted(node.slices.items()))
            lines.append(f"#   node {node.name} ({node.product}, mig.config={node.mig_config}): {slices}{state}")
    for p in plan.pools:
        if p.profile is None:
            continue
        lines.append(
            f"# pool {p.pool}: {p.profile} ×{p.slices}; {len(p.variants)} deployment(s) {p.variants}, "
            f"replicas {p.min_replicas}..{p.max_replicas} each (configured {p.configured[0]}..{p.configured[1]})"
        )
        lines += [f"#   {n}" for n in p.notes]
    lines += [f"# warning: {w}" for w in plan.warnings]
    return "\n".join(lines) + "\n" + yaml.safe_dump(values_snippet(plan), sort_keys=False)
