"""Promotion pre-scaling: raise engine minimums on the RayService for a window, then put them back.

What is patched, and why this way:

- **Serve**: an entry per engine deployment under the app's ``deployments:`` in
  ``spec.serveConfigV2``: its ``autoscaling_config`` with a floor window added to the
  queue-aware policy's ``policy_kwargs`` (``num_replicas`` for a fixed-size deployment). The
  policy holds the floor exactly inside the window, between CronJob runs too. Serve applies
  deployment-level scaling options without restarting replicas; changing the app's ``args``
  (the platform config) would redeploy every replica — engines reloading at the start of a
  promotion.
- **KubeRay**: the pool's worker group ``minReplicas`` (and ``replicas``/``maxReplicas`` where
  they would be below it), so pods with slices are up before the traffic. KubeRay leaves these
  fields out of the cluster hash: the cluster is updated in place, never recreated.
- The original values go into one annotation (``zimage.dev/promo``), written in the same patch,
  so a restore is exact (the original ``serveConfigV2`` text byte for byte, when nothing else
  changed it meanwhile) and both directions are idempotent (no write when already there). Every
  patch is a JSON patch that first tests the resourceVersion read.

The CronJob runs ``ops promo --window START/END --min-replicas POOL=N ...`` every few minutes:
inside the window it applies (no-op once applied), outside it restores (no-op once restored).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import yaml

from zimage_platform.k8s.tenants import _pointer
from zimage_platform.scheduling.autoscaling import serve_autoscaling_config

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from zimage_platform.config import PlatformConfig

ANNOTATION = "zimage.dev/promo"
POOL_LABEL = "zimage.dev/pool"
BUILDER = "zimage_platform.serve.builder:app_builder"
GROUP_FIELDS = ("replicas", "minReplicas", "maxReplicas")
SLICE_RESOURCES = ("nvidia.com/mig-", "nvidia.com/gpu")
GROUP = ("ray.io", "v1", "rayservices")
#: A floor applied without a window holds until ``--restore``.
OPEN_START = datetime(1970, 1, 1, tzinfo=UTC)
OPEN_END = datetime(9999, 12, 31, tzinfo=UTC)


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    @classmethod
    def parse(cls, text: str) -> Window:
        """``START/END`` in ISO 8601 with a UTC offset (``2025-11-11T00:00:00+08:00/2025-11-12T02:00:00+08:00``)."""
        start_s, sep, end_s = text.partition("/")
        try:
            start, end = datetime.fromisoformat(start_s), datetime.fromisoformat(end_s)
        except ValueError:
            start = end = None  # type: ignore[assignment]
        if not sep or start is None or end is None:
            raise ValueError(f"--window must be START/END in ISO 8601, got {text!r}")
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError(f"--window times need a UTC offset (Z or +08:00): {text!r}")
        if end <= start:
            raise ValueError(f"--window ends before it starts: {text!r}")
        return cls(start, end)

    def __contains__(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    def __str__(self) -> str:
        return f"{self.start.isoformat()}/{self.end.isoformat()}"


@dataclass
class PromoOutcome:
    action: Literal["applied", "restored", "unchanged", "outside window"]
    name: str
    namespace: str
    dry_run: bool = False
    patch: list[dict[str, Any]] = field(default_factory=list)
    deployments: dict[str, Any] = field(default_factory=dict)
    worker_groups: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# -- reading the RayService --------------------------------------------------------------


def _app(serve: dict[str, Any]) -> dict[str, Any]:
    for app in serve.get("applications") or []:
        if app.get("import_path") == BUILDER:
            return app
    raise ValueError(f"serveConfigV2 has no application with import_path {BUILDER}")


def _platform_config(app: dict[str, Any]) -> PlatformConfig:
    from zimage_platform.config import PlatformConfig, load_config

    args = app.get("args") or {}
    if "config" in args:
        return PlatformConfig.model_validate(args["config"])
    return load_config(args.get("config_path"))


def _slices_per_pod(group: dict[str, Any]) -> int:
    for container in (group.get("template") or {}).get("spec", {}).get("containers") or []:
        limits = (container.get("resources") or {}).get("limits") or {}
        for resource, quantity in limits.items():
            if resource.startswith(SLICE_RESOURCES):
                return max(1, int(str(quantity)))
    return 1


def _groups_of(spec: dict[str, Any], pool: str) -> list[int]:
    groups = spec.get("rayClusterConfig", {}).get("workerGroupSpecs") or []
    labelled = [
        i
        for i, g in enumerate(groups)
        if ((g.get("template") or {}).get("metadata") or {}).get("labels", {}).get(POOL_LABEL) == pool
    ]
    return labelled or [i for i, g in enumerate(groups) if g.get("groupName") == pool]


# -- what the promotion looks like ---------------------------------------------------------


def _engine_entry(
    config: PlatformConfig, pool: str, original: dict[str, Any] | None, n: int, window: Window | None
) -> dict[str, Any]:
    """The Serve ``deployments:`` entry for an engine deployment held at ``n`` replicas or more.

    An autoscaled deployment gets a floor of its queue-aware policy for the window (open until
    the restore when there is none): the policy that scales it on its queue also holds the
    promotion's minimum, exactly inside the window, whenever this runs. A fixed-size deployment
    gets ``num_replicas``."""
    pool_cfg = config.pools[pool]
    scaling = pool_cfg.autoscaling
    entry = copy.deepcopy(original) if original else {}
    if "num_replicas" in entry or (scaling.fixed and "autoscaling_config" not in entry):
        base = entry.get("num_replicas", scaling.min_replicas)
        entry["num_replicas"] = max(int(base), n)
        return entry
    ours = serve_autoscaling_config(scaling, pool_cfg.max_concurrent_batches)
    auto = entry.get("autoscaling_config") or ours
    auto.setdefault("policy", ours["policy"])
    start, end = (window.start, window.end) if window else (OPEN_START, OPEN_END)
    floor = {"start": start.isoformat(), "end": end.isoformat(), "min_replicas": n}
    auto["policy"].setdefault("policy_kwargs", {}).setdefault("floors", []).append(floor)
    auto["max_replicas"] = max(int(auto.get("max_replicas", 1)), n)
    entry["autoscaling_config"] = auto
    return entry


def _promoted(
    spec: dict[str, Any], record: dict[str, Any], mins: dict[tuple[str, str], int], window: Window | None
) -> tuple[str, dict[str, dict[str, int]]]:
    """The serveConfigV2 text and worker-group fields of the promotion, from the originals in ``record``."""
    from zimage_platform.serve.builder import engine_deployment_name

    serve = yaml.safe_load(record["serveConfigV2"]["original"])
    app = _app(serve)
    config = _platform_config(app)
    entries = app.setdefault("deployments", [])
    by_name = {e.get("name"): i for i, e in enumerate(entries)}
    slices: dict[str, int] = {}
    for pool in config.pools:
        for variant in config.pool_variants(pool):
            name = engine_deployment_name(variant, pool)
            original = entries[by_name[name]] if name in by_name else None
            n = mins.get((pool, variant))
            entry = _engine_entry(config, pool, original, n, window) if n is not None else (original or {})
            if n is not None:
                entry["name"] = name
                if name in by_name:
                    entries[by_name[name]] = entry
                else:
                    entries.append(entry)
            least = entry.get("num_replicas", (entry.get("autoscaling_config") or {}).get("min_replicas"))
            if least is None:
                least = config.pools[pool].autoscaling.min_replicas
            slices[pool] = slices.get(pool, 0) + max(int(least), n or 0)
    groups = spec["rayClusterConfig"]["workerGroupSpecs"]
    fields: dict[str, dict[str, int]] = {}
    for pool in {p for p, _ in mins}:
        indices = _groups_of(spec, pool)
        if not indices:
            continue
        name = groups[indices[0]]["groupName"]
        original = record["workerGroups"].get(name, {}).get("original") or {
            k: groups[indices[0]].get(k) for k in GROUP_FIELDS
        }
        pods = math.ceil(slices[pool] / _slices_per_pod(groups[indices[0]]))
        minimum = max(int(original.get("minReplicas") or 0), pods)
        fields[name] = {
            "replicas": max(int(original.get("replicas") or 0), minimum),
            "minReplicas": minimum,
            "maxReplicas": max(int(original.get("maxReplicas") or 0), minimum),
        }
    if not app["deployments"]:
        del app["deployments"]
    return yaml.safe_dump(serve, sort_keys=False), fields


def _group_ops(spec: dict[str, Any], fields: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    for i, group in enumerate(spec["rayClusterConfig"]["workerGroupSpecs"]):
        for key, value in (fields.get(group.get("groupName")) or {}).items():
            if value is None:
                if key in group:
                    ops.append({"op": "remove", "path": f"/spec/rayClusterConfig/workerGroupSpecs/{i}/{key}"})
            elif group.get(key) != value:
                ops.append({"op": "add", "path": f"/spec/rayClusterConfig/workerGroupSpecs/{i}/{key}", "value": value})
    return ops


def _annotation_ops(obj: dict[str, Any], value: str | None) -> list[dict[str, Any]]:
    annotations = obj["metadata"].get("annotations")
    path = "/metadata/annotations/" + _pointer(ANNOTATION)
    if value is None:
        return [{"op": "remove", "path": path}] if annotations and ANNOTATION in annotations else []
    if annotations is None:
        return [{"op": "add", "path": "/metadata/annotations", "value": {ANNOTATION: value}}]
    return [{"op": "add", "path": path, "value": value}]


def plan_apply(obj: dict[str, Any], mins_spec: dict[str, int], window: Window | None) -> PromoOutcome:
    """The JSON patch that pre-scales ``obj`` (empty when it already is)."""
    meta, spec = obj["metadata"], obj["spec"]
    existing = (meta.get("annotations") or {}).get(ANNOTATION)
    record = (
        json.loads(existing)
        if existing
        else {
            "serveConfigV2": {"original": spec["serveConfigV2"]},
            "workerGroups": {},
        }
    )
    config = _platform_config(_app(yaml.safe_load(record["serveConfigV2"]["original"])))
    mins = config.deployment_counts(mins_spec, "--min-replicas", source="the RayService's serveConfigV2")
    text, fields = _promoted(spec, record, mins, window)
    groups = {g["groupName"]: g for g in spec["rayClusterConfig"]["workerGroupSpecs"]}
    for name in fields:
        record["workerGroups"].setdefault(name, {"original": {k: groups[name].get(k) for k in GROUP_FIELDS}})
        record["workerGroups"][name]["applied"] = fields[name]
    record["serveConfigV2"]["applied"] = text
    record["window"] = str(window) if window else None
    record["minReplicas"] = dict(sorted(mins_spec.items()))
    outcome = PromoOutcome("applied", meta["name"], meta.get("namespace", ""), worker_groups=fields)
    outcome.deployments = {f"{p}/{v}": n for (p, v), n in sorted(mins.items())}
    missing = sorted({p for p, _ in mins} - {pool for pool in config.pools if _groups_of(spec, pool)})
    if missing:
        outcome.warnings.append(f"no worker group for pool(s) {missing}: only Serve minimums are raised")
    ops: list[dict[str, Any]] = []
    if spec["serveConfigV2"] != text:
        ops.append({"op": "replace", "path": "/spec/serveConfigV2", "value": text})
    ops += _group_ops(spec, fields)
    new_annotation = json.dumps(record, sort_keys=True)
    if ops or existing != new_annotation:
        ops += _annotation_ops(obj, new_annotation)
    if not ops:
        outcome.action = "unchanged"
        return outcome
    outcome.patch = [{"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]}, *ops]
    return outcome


def plan_restore(obj: dict[str, Any]) -> PromoOutcome:
    """The JSON patch that puts back what :func:`plan_apply` recorded (empty when nothing is recorded)."""
    meta, spec = obj["metadata"], obj["spec"]
    outcome = PromoOutcome("restored", meta["name"], meta.get("namespace", ""))
    existing = (meta.get("annotations") or {}).get(ANNOTATION)
    if not existing:
        outcome.action = "unchanged"
        return outcome
    record = json.loads(existing)
    ops: list[dict[str, Any]] = []
    serve = record["serveConfigV2"]
    if spec["serveConfigV2"] == serve.get("applied"):
        ops.append({"op": "replace", "path": "/spec/serveConfigV2", "value": serve["original"]})
    elif spec["serveConfigV2"] != serve["original"]:
        outcome.warnings.append("serveConfigV2 changed since the promotion was applied: left as it is")
    groups = {g["groupName"]: g for g in spec["rayClusterConfig"]["workerGroupSpecs"]}
    fields: dict[str, dict[str, Any]] = {}
    for name, entry in record["workerGroups"].items():
        group = groups.get(name)
        if group is None:
            outcome.warnings.append(f"worker group {name} is gone: nothing to restore there")
            continue
        restore = {}
        for key in GROUP_FIELDS:
            if group.get(key) == entry.get("applied", {}).get(key):
                restore[key] = entry["original"].get(key)
            elif group.get(key) != entry["original"].get(key):
                outcome.warnings.append(f"worker group {name}: {key} changed since the promotion: left as it is")
        fields[name] = restore
    outcome.worker_groups = fields
    ops += _group_ops(spec, fields)
    ops += _annotation_ops(obj, None)
    outcome.patch = [{"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]}, *ops]
    return outcome


# -- against the API server ----------------------------------------------------------------


def promote(
    api: ApiClient,
    namespace: str,
    name: str,
    minimums: dict[str, int],
    *,
    window: Window | None,
    now: datetime,
    restore: bool = False,
    dry_run: bool = False,
) -> PromoOutcome:
    """Read the RayService, decide (inside the window: apply; outside or ``restore``: restore), patch."""
    from kubernetes.client import CustomObjectsApi

    custom = CustomObjectsApi(api)
    obj = custom.get_namespaced_custom_object(GROUP[0], GROUP[1], namespace, GROUP[2], name)
    if restore or (window is not None and now not in window):
        outcome = plan_restore(obj)
        if outcome.action == "unchanged" and not restore:
            outcome.action = "outside window"
    else:
        outcome = plan_apply(obj, minimums, window)
    outcome.dry_run = dry_run
    if outcome.patch and not dry_run:
        # The client defaults to a merge patch for custom objects: ours is a JSON patch (with a test).
        custom.patch_namespaced_custom_object(
            GROUP[0], GROUP[1], namespace, GROUP[2], name, outcome.patch, _content_type="application/json-patch+json"
        )
    return outcome
