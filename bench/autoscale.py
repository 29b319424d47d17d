"""Autoscaling benchmark: the real app against ``zimage-platform plan`` under a promotion ramp.

How it measures, and why:

* The real platform over HTTP (``build_app`` on a local Ray, SeaweedFS S3, SQLite:
  ``bench.common.BenchCluster``) on the **simulated engine** (benchmarks only: no model; each
  batch sleeps the GPU latency model's time, ``ops/latency/h800-mig.yaml``, for its pool's MIG
  slice and precision), with the autoscaling pool layout ``bench/autoscale-pools.yaml``: one
  pool per class, each scaled by the platform's queue-aware Serve policy, bulk from zero. On a
  GPU-sized engine time that takes no CPU, replicas are cheap enough for 2 cores to run nine.
* The load is a profile (``ops/profiles/promo-ramp-bench.yaml``) replayed open loop with the
  arrival times and image counts the simulator draws for it (``LoadProfile.schedule``): a
  request is one synchronous ``POST /v1/images/generations`` of ``n`` images, a bulk submission
  one ``POST /v1/batches`` CSV of its jobs. One tenant per stream (its class, limits far above
  the load).
* While it runs, every ``--poll`` s: each engine deployment's replicas (``serve.status()``:
  running and starting) and the scheduler's view of its work (batches in flight and queued:
  what the policy scales on).
* Then every accepted job (every job row: a refused request writes none) must succeed, and the
  ledger must hold one row per image done and per image accepted.
* The capacity simulator (what ``zimage-platform plan`` runs) then simulates the same profile
  on the same pool config with the same latency model, a new replica taking the start-up time
  measured in this run. Per class, the real p95 (a request: HTTP latency; a bulk job: its
  submission's send time to the job row's finish) and the plan's (arrival to last image, plus
  the model's request overhead) must agree within 25 %.
* Scale-up: each replica start seen is matched with the moment the work first called for more
  replicas than there were (``desired_replicas`` on the polled work, continuously since; while no
  replica serves, the policy sees only the scheduler's wake-up call, not the queue). The
  decision must come within the configured delay (``upscale_delay_s + look_back_s +
  metrics_interval_s``: Serve averages the reported work over the look-back before the delay
  starts) plus one poll; start-up (starting → running) is reported against the profile's.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import (
    BENCH_LIMITS,
    REPO,
    SIMULATED_LATENCY,
    VARIANT,
    BenchCluster,
    CpuSnapshot,
    JsonOut,
    MaxNoise,
    QuietWait,
    Render,
    Target,
    add_tenant,
    engine_description,
    engine_meta,
    fmt_num,
    generation_body,
    log,
    markdown_table,
    open_loop,
    percentile,
    read_job_times,
    read_json,
    run_meta,
    tenant_outcomes,
    timed_post,
    wait_all_ready,
    wait_for_others_quiet,
    with_engine,
    write_json,
)

if TYPE_CHECKING:
    import httpx

    from zimage_platform.config import AutoscalingConfig, PlatformConfig
    from zimage_platform.scheduling.simulation import LoadProfile

PROFILE = REPO / "ops" / "profiles" / "promo-ramp-bench.yaml"
POOLS = REPO / "bench" / "autoscale-pools.yaml"
APP = "autoscale"
TOLERANCE = 0.25
CLASSES = ("realtime", "standard", "bulk")
TERMINAL = ("succeeded", "failed", "cancelled")


# -- the replay -------------------------------------------------------------------------------


@dataclass
class Sent:
    """One request or bulk submission of the replay, as the client saw it."""

    stream: str
    priority: str
    #: ``request`` (synchronous generation) or ``submission`` (a bulk CSV of ``jobs`` jobs).
    kind: str
    at: float
    jobs: int
    images: int
    #: Seconds from the replay's start when it was sent, and the same as an epoch time.
    sent: float = 0.0
    sent_at: float = 0.0
    latency_s: float | None = None
    status: int = 0
    job_ids: list[str] | None = None
    error: str | None = None


def replay_plan(profile: LoadProfile, config: PlatformConfig) -> list[tuple[float, Sent]]:
    """What to send when: the profile's schedule, each arrival labelled with its stream and class.
    Only ``turbo`` is deployed: a stream of another variant is refused here, before Ray starts."""
    from zimage_platform.scheduling.simulation.profile import resolve_streams

    streams = resolve_streams(profile, config)
    other = sorted({s.variant for s in streams} - {VARIANT})
    if other:
        raise typer.BadParameter(f"the benchmark serves {VARIANT} only; the profile asks for {other}")
    return [
        (
            a.at_s,
            Sent(
                stream=streams[a.stream].name,
                priority=streams[a.stream].priority,
                kind="submission" if a.submission else "request",
                at=a.at_s,
                jobs=a.jobs,
                images=a.images,
            ),
        )
        for a in profile.schedule()
    ]


def batch_csv(tag: str, jobs: int) -> bytes:
    """A bulk file: one prompt per row."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["prompt"])
    writer.writerows([f"{tag} row {i}"] for i in range(jobs))
    return out.getvalue().encode()


async def replay(
    url: str, keys: dict[str, str], plan: list[tuple[float, Sent]], sizes: dict[str, str], steps: dict[str, int]
) -> list[Sent]:
    """Send the plan open loop; fill in what each answer said."""

    async def send(http: httpx.AsyncClient, i: int, s: Sent) -> Sent:
        headers = {"Authorization": f"Bearer {keys[s.stream]}"}
        tag = f"promo {s.stream} #{i}"
        s.sent_at = time.time()
        if s.kind == "request":
            body = {**generation_body(tag, sizes[s.stream], seed=i), "n": s.images, "steps": steps[s.stream]}
            response, s.sent_at, s.latency_s = await timed_post(http, f"{url}/v1/images/generations", body, headers)
            s.status = response.status_code if response is not None else 0
            if s.status == 200 and response is not None:
                s.job_ids = [response.json()["job_id"]]
        else:
            defaults = {"size": sizes[s.stream], "n": s.images, "steps": steps[s.stream], "seed": i}
            started = time.perf_counter()
            try:
                response = await http.post(
                    f"{url}/v1/batches",
                    files={"file": ("rows.csv", batch_csv(tag, s.jobs), "text/csv")},
                    data={"request": json.dumps({"defaults": defaults})},
                    headers=headers,
                )
            except Exception as exc:  # a transport failure is a result here
                s.error = f"{type(exc).__name__}: {exc}"
                return s
            s.latency_s, s.status = time.perf_counter() - started, response.status_code
            if s.status == 202:
                s.job_ids = [row["job_id"] for row in response.json()["rows"]]
        if s.status not in (200, 202) and s.error is None:
            s.error = f"HTTP {s.status}"
        return s

    answers = await open_loop(plan, send)
    for sent, s in answers:
        s.sent = sent
    return [s for _, s in answers]


# -- replicas and the work they scale on, while the replay runs --------------------------------


class ReplicaWatch(threading.Thread):
    """Polls, every ``poll_s``, each engine deployment's replicas (running, starting) and the
    scheduler's view of its work; rows ``[epoch, running, starting, batches]`` per deployment."""

    def __init__(self, deployments: dict[str, tuple[str, str]], poll_s: float) -> None:
        super().__init__(name="replica-watch", daemon=True)
        self.deployments = deployments
        self.poll_s = poll_s
        self.rows: dict[str, list[list[float]]] = {name: [] for name in deployments}
        self._finished = threading.Event()

    def run(self) -> None:
        from ray import serve
        from ray.serve._private.common import ReplicaState

        scheduler = serve.get_deployment_handle("Scheduler", APP)
        while not self._finished.is_set():
            started = time.perf_counter()
            try:
                app = serve.status().applications.get(APP)
                for name, (pool, variant) in self.deployments.items():
                    states = app.deployments[name].replica_states if app and name in app.deployments else {}
                    load = scheduler.engine_load.remote(pool, variant).result(timeout_s=5)
                    batches = load.get("inflight_batches", 0.0) + load.get("queued_batches", 0.0)
                    running = states.get(ReplicaState.RUNNING, 0)
                    starting = states.get(ReplicaState.STARTING, 0)
                    self.rows[name].append([time.time(), running, starting, batches])
            except Exception as exc:  # one missed poll is a gap, not the end of the run
                log(f"replica watch: {type(exc).__name__}: {exc}")
            self._finished.wait(max(0.0, self.poll_s - (time.perf_counter() - started)))

    def stop(self) -> None:
        self._finished.set()
        self.join(timeout=10)


# -- analysis (pure: tested without a cluster) -------------------------------------------------


def replica_starts(rows: list[list[float]]) -> list[tuple[float | None, float | None]]:
    """``(seen starting, seen running)`` per replica start in a deployment's polled rows
    (``[t, running, starting, batches]``): first in, first out; a start still under way at the
    end has no running time, one under way when the watch began no start time, and a start
    that vanished without running (cancelled) is dropped."""
    out: list[tuple[float | None, float | None]] = []
    if not rows:
        return out
    pending: deque[float | None] = deque([None] * int(rows[0][2]))
    _, prev_running, prev_starting, _ = rows[0]
    for t, running, starting, _ in rows[1:]:
        promoted = max(0, int(running - prev_running))
        left = max(0, int(prev_starting) - promoted)
        new, cancelled = max(0, int(starting) - left), max(0, left - int(starting))
        for _ in range(promoted):
            out.append((pending.popleft() if pending else None, t))
        for _ in range(cancelled):
            if pending:
                pending.pop()
        pending.extend([t] * new)
        prev_running, prev_starting = running, starting
    out += [(s, None) for s in pending]
    return out


def scale_ups(rows: list[list[float]], scaling: AutoscalingConfig, slots: int) -> list[dict[str, Any]]:
    """Each replica start with the moment the work called for it: the first poll of the run of
    polls, just before the start, in which the policy's decision on the work it could see
    (``desired_replicas``) exceeded the replicas there were (running + starting). While no
    replica serves, none reports the queue: the policy sees the scheduler's one wake-up call."""
    from zimage_platform.scheduling.autoscaling import desired_replicas

    def wanted(row: list[float]) -> int:
        return desired_replicas(
            row[3] if row[1] else min(row[3], 1.0),
            slots=slots,
            target=scaling.target_ongoing_requests,
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
        )

    times = [r[0] for r in rows]
    events = []
    for started, ready in replica_starts(rows):
        if started is None:
            continue
        i = times.index(started)
        need, from_zero = started, False
        j = i - 1
        while j >= 0 and wanted(rows[j]) > rows[j][1] + rows[j][2]:
            need, from_zero = rows[j][0], rows[j][1] + rows[j][2] == 0
            j -= 1
        events.append(
            {
                "needed_at": need,
                "started_at": started,
                "running_at": ready,
                "from_zero": from_zero,
                "decision_s": started - need,
                "startup_s": None if ready is None else ready - started,
                "scale_up_s": None if ready is None else ready - need,
            }
        )
    return events


def configured_delay(scaling: AutoscalingConfig) -> float:
    """How long the policy can take to act on new work, by its configuration: the reported work
    is averaged over ``look_back_s`` (reports every ``metrics_interval_s``), then a change up
    waits ``upscale_delay_s``."""
    return scaling.upscale_delay_s + scaling.look_back_s + scaling.metrics_interval_s


def class_latencies(sent: list[Sent], finished: dict[str, float]) -> dict[str, list[float]]:
    """Per class: each request's HTTP latency (answered 200), each bulk job's time from its
    submission's send to its finish (``finished``: job id → epoch)."""
    out: dict[str, list[float]] = {c: [] for c in CLASSES}
    for s in sent:
        if s.kind == "request" and s.status == 200 and s.latency_s is not None:
            out[s.priority].append(s.latency_s)
        elif s.kind == "submission":
            out[s.priority] += [finished[j] - s.sent_at for j in s.job_ids or [] if j in finished]
    return {c: v for c, v in out.items() if v}


def p95_targets(real: dict[str, float | None], plan: dict[str, float | None]) -> list[Target]:
    """Per class: |plan − real| ÷ real p95, within the tolerance."""
    targets = []
    for cls in CLASSES:
        if cls not in real and cls not in plan:
            continue
        r, p = real.get(cls), plan.get(cls)
        error = abs(p - r) / r if r and p is not None else None
        targets.append(Target(f"{cls}: |plan − real| p95 ÷ real", error, TOLERANCE, "≤", unit=""))
    return targets


def scale_up_target(events: list[dict[str, Any]], allowed: dict[str, float]) -> Target:
    """The slowest decision (over every deployment's starts) against its allowance: the
    configured delay plus one poll. Measured as ``decision − allowed`` so one threshold fits all."""
    overs = [e["decision_s"] - allowed[e["deployment"]] for e in events]
    return Target(
        "replica starts decided within the configured delay + one poll (slowest: decision − allowance)",
        max(overs) if overs else None,
        0.0,
        "≤",
        unit=" s",
    )


# -- running it --------------------------------------------------------------------------------


def measure(
    base: PlatformConfig,
    profile: LoadProfile,
    *,
    poll_s: float,
    drain_timeout_s: float,
    max_noise: float,
    quiet_wait: float,
) -> dict[str, Any]:
    from zimage_platform.scheduling.simulation.profile import resolve_streams
    from zimage_platform.serve.builder import engine_deployment_name

    streams = resolve_streams(profile, base)
    plan = replay_plan(profile, base)
    tenants = sorted({s.tenant_id for s in streams})
    with BenchCluster(base) as cluster:
        config = cluster.platform_config(APP, "/")
        classes = {s.tenant_id: s.priority for s in streams}
        keys_by_tenant = {t: add_tenant(config, t, priority_class=classes[t], limits=BENCH_LIMITS) for t in tenants}
        keys = {s.name: keys_by_tenant[s.tenant_id] for s in streams}
        url = cluster.deploy_platform(config)
        log(f"ready after {wait_all_ready([url]):.0f} s")
        deployments = {engine_deployment_name(v, p): (p, v) for p in config.pools for v in config.pool_variants(p)}
        quiet_wait_s = wait_for_others_quiet(max_noise, quiet_wait)
        watch = ReplicaWatch(deployments, poll_s)
        watch.start()
        time.sleep(2 * poll_s)  # a baseline before the first arrival
        log(f"replaying {profile.name}: {len(plan)} requests and submissions over {profile.duration_s:.0f} s …")
        replay_start, before = time.time(), CpuSnapshot.take()
        sent = asyncio.run(
            replay(url, keys, plan, {s.name: s.size for s in streams}, {s.name: s.steps for s in streams})
        )
        others = before.others_share(CpuSnapshot.take())
        log("waiting for every accepted job …")
        deadline = time.perf_counter() + drain_timeout_s
        while (outcomes := tenant_outcomes(config, tenants)).open and time.perf_counter() < deadline:
            time.sleep(2.0)
        drained_at = time.time()
        time.sleep(2 * poll_s)
        watch.stop()
        times = read_job_times(config, list(outcomes.jobs))
    return {
        "replay_start": replay_start,
        "drained_at": drained_at,
        "quiet_wait_s": quiet_wait_s,
        "others": others,
        "sent": [asdict(s) for s in sent],
        "jobs": {j: {"status": outcomes.jobs[j], **(asdict(times[j]) if j in times else {})} for j in outcomes.jobs},
        "images_requested": outcomes.images_requested,
        "images_done": outcomes.images_done,
        "ledger_rows": outcomes.ledger_rows,
        "timeline": watch.rows,
        "deployments": deployments,
    }


def plan_run(config: PlatformConfig, profile: LoadProfile, startup_s: dict[str, float]) -> dict[str, Any]:
    """What ``zimage-platform plan`` answers for the profile and pools, with these start-up times
    (per pool, ``default`` for the rest) instead of the profile's."""
    from zimage_platform.scheduling.simulation import load_latency, simulate

    measured = profile.model_copy(update={"startup_s": {**profile.startup_s, **startup_s}})
    result = simulate(config, measured, load_latency(SIMULATED_LATENCY, config))
    return json.loads(json.dumps(result.to_dict(), default=str))


def startup_by_pool(events: list[dict[str, Any]], deployments: dict[str, Any]) -> dict[str, float]:
    """The median start-up seen per pool, and over all as ``default`` (pools that started none)."""
    out: dict[str, float] = {}
    everything = [e["startup_s"] for e in events if e["startup_s"] is not None]
    if everything:
        out["default"] = statistics.median(everything)
    for name, (pool, _) in deployments.items():
        mine = [e["startup_s"] for e in events if e["deployment"] == name and e["startup_s"] is not None]
        if mine:
            out[pool] = statistics.median(mine)
    return out


def where_the_time_went(sent: list[Sent], jobs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per class, p95 of each part of a job's time: queued (accepted → claimed by a batch),
    inside the scheduler (accepted → finished) and, for requests, outside it (HTTP latency −
    inside: proxy, ingress, job rows, the answer)."""
    parts: dict[str, dict[str, list[float]]] = {}
    for s in sent:
        for job_id in s.job_ids or []:
            job = jobs.get(job_id) or {}
            if not job.get("finished_at") or not job.get("started_at"):
                continue
            mine = parts.setdefault(s.priority, {"queued": [], "inside": [], "outside": []})
            inside = job["finished_at"] - job["created_at"]
            mine["queued"].append(job["started_at"] - job["created_at"])
            mine["inside"].append(inside)
            if s.kind == "request" and s.latency_s is not None:
                mine["outside"].append(s.latency_s - inside)
    return {cls: {k: percentile(v, 95) for k, v in p.items()} for cls, p in parts.items()}


def analyse(config: PlatformConfig, measured: dict[str, Any], poll_s: float) -> dict[str, Any]:
    """Scale-up events and start-ups per deployment; latencies per class."""
    events, allowed = [], {}
    for name, (pool, _) in measured["deployments"].items():
        scaling = config.pools[pool].autoscaling
        allowed[name] = configured_delay(scaling) + poll_s
        for e in scale_ups(measured["timeline"][name], scaling, config.pools[pool].max_concurrent_batches):
            events.append({"deployment": name, **e})
    finished = {j: v["finished_at"] for j, v in measured["jobs"].items() if v.get("finished_at")}
    sent = [Sent(**s) for s in measured["sent"]]
    return {
        "events": events,
        "allowed_decision_s": allowed,
        "startup_s": startup_by_pool(events, measured["deployments"]),
        "latencies": class_latencies(sent, finished),
        "p95_parts": where_the_time_went(sent, measured["jobs"]),
    }


def summary(meta: dict[str, Any], measured: dict[str, Any], analysis: dict[str, Any], plan: dict[str, Any]) -> str:
    sent = [Sent(**s) for s in measured["sent"]]
    statuses = [v["status"] for v in measured["jobs"].values()]
    rows, real95, plan95 = [], {}, {}
    for cls in CLASSES:
        lat = analysis["latencies"].get(cls, [])
        simulated = plan["classes"].get(cls)
        if not lat and simulated is None:
            continue
        real95[cls] = percentile(lat, 95)
        plan95[cls] = simulated["latency_s"]["p95"] if simulated else None
        mine = [s for s in sent if s.priority == cls]
        refused = sum(1 for s in mine if s.status not in (200, 202))
        parts = analysis["p95_parts"].get(cls, {})
        rows.append(
            [
                cls,
                f"{sum(s.jobs for s in mine)} / {sum(s.jobs * s.images for s in mine)}",
                str(refused),
                f"{fmt_num(percentile(lat, 50), '.2f')} / {fmt_num(real95[cls], '.2f')}",
                f"{fmt_num(simulated['latency_s']['p50'] if simulated else None, '.2f')} / "
                f"{fmt_num(plan95[cls], '.2f')}",
                fmt_num(abs(plan95[cls] - real95[cls]) / real95[cls] if real95[cls] and plan95[cls] else None, ".0%"),
                " / ".join(fmt_num(parts.get(k), ".2f") for k in ("queued", "inside", "outside")),
                fmt_num(simulated["queue_wait_p95_s"] if simulated else None, ".2f"),
            ]
        )
    classes = markdown_table(
        [
            "class",
            "jobs / images",
            "refused",
            "real p50 / p95 (s)",
            "plan p50 / p95 (s)",
            "p95 difference",
            "real p95 queued / inside / outside (s)",
            "plan p95 queued (s)",
        ],
        rows,
    )
    deployments = []
    for name, (pool, variant) in measured["deployments"].items():
        timeline = measured["timeline"][name]
        mine = [e for e in analysis["events"] if e["deployment"] == name]
        simulated = plan["pools"][pool]["deployments"][variant]
        decisions = [e["decision_s"] for e in mine]
        startups = [e["startup_s"] for e in mine if e["startup_s"] is not None]
        ups = [e["scale_up_s"] for e in mine if e["scale_up_s"] is not None]
        deployments.append(
            [
                name,
                f"{max((r[1] for r in timeline), default=0):.0f} / {simulated['peak_replicas']}",
                str(len(mine)),
                fmt_num(max(decisions) if decisions else None, ".1f"),
                f"{analysis['allowed_decision_s'][name]:.1f}",
                fmt_num(statistics.median(startups) if startups else None, ".1f"),
                fmt_num(max(ups) if ups else None, ".1f"),
            ]
        )
    replicas = markdown_table(
        [
            "deployment",
            "peak replicas real / plan",
            "starts",
            "slowest decision (s)",
            "allowed (s)",
            "start-up p50 (s)",
            "slowest scale-up (s)",
        ],
        deployments,
    )
    lost = sum(1 for s in statuses if s != "succeeded")
    targets = [
        *p95_targets(real95, plan95),
        scale_up_target(analysis["events"], analysis["allowed_decision_s"]),
        Target("accepted jobs that did not succeed", float(lost), 0.0, "≤", unit=""),
        Target(
            "ledger rows − images done (and − images accepted)",
            float(
                max(
                    abs(measured["ledger_rows"] - measured["images_done"]),
                    abs(measured["ledger_rows"] - measured["images_requested"]),
                )
            ),
            0.0,
            "≤",
            unit="",
        ),
    ]
    startups = ", ".join(f"{pool} {v:.0f} s" for pool, v in analysis["startup_s"].items() if pool != "default")
    lines = [
        f"`{meta['command']}` — {meta['date']}, source {meta['source']}; {meta['machine']}; "
        f"other processes took {fmt_num(measured.get('others'), '.0%')} of the CPU during the replay",
        "",
        f"Engine: {engine_description(meta['engine'])}.",
        "",
        f"Profile `{meta['profile']}` on `{meta['pools']}`: {len(sent)} requests and submissions; "
        f"{len(statuses)} jobs accepted, {statuses.count('succeeded')} succeeded; "
        f"{measured['images_done']} images, {measured['ledger_rows']} ledger rows "
        f"({measured['images_requested']} images accepted). Plan: the same profile and pools, a new replica "
        f"taking the median start-up measured here ({startups or 'none seen'}; the profile says "
        f"{fmt_num(meta.get('profile_startup_s'), '.0f', ' s')}), simulated in {plan['wall_s']:.2f} s.",
        "",
        classes,
        "",
        replicas,
        "",
        *(t.line() for t in targets),
    ]
    return "\n".join(lines)


def main(
    profile_path: Annotated[Path, typer.Option("--profile", help="Load profile YAML (ops/profiles/*.yaml).")] = PROFILE,
    config_path: Annotated[
        Path, typer.Option("--config", help="Platform config YAML: the autoscaling pool layout.")
    ] = POOLS,
    poll: Annotated[float, typer.Option(min=0.1, help="Seconds between replica and load readings.")] = 0.5,
    drain_timeout: Annotated[float, typer.Option(min=10, help="Seconds to wait for accepted jobs to finish.")] = 300,
    max_noise: MaxNoise = 0.2,
    quiet_wait: QuietWait = 60.0,
    json_out: JsonOut = None,
    render: Render = None,
) -> None:
    """The real app (simulated engine, autoscaling pools) vs `zimage-platform plan` under a promotion ramp:
    p95 per class, scale-up vs the configured delay, nothing lost, ledger rows = images."""
    from zimage_platform.config import load_config
    from zimage_platform.scheduling.simulation import load_profile

    if render is not None:  # the run as measured; analysis and plan again, with this code
        saved = read_json(render)
        meta, measured = saved["meta"], saved["measured"]
        config, profile = load_config(REPO / meta["pools"]), load_profile(REPO / meta["profile"])
        poll = meta.get("poll_s", poll)
    else:
        config, profile = load_config(config_path), load_profile(profile_path)
        replay_plan(profile, config)  # a bad profile fails here, before Ray starts
        base = with_engine(config, "simulated", slice_=None, precision=None)
        meta = run_meta(
            sys.argv[1:],
            profile=os.path.relpath(profile_path, REPO),
            pools=os.path.relpath(config_path, REPO),
            profile_startup_s=profile.startup_for(next(iter(config.pools))),
            poll_s=poll,
            engine=engine_meta(base),
        )
        measured = measure(
            base, profile, poll_s=poll, drain_timeout_s=drain_timeout, max_noise=max_noise, quiet_wait=quiet_wait
        )
        meta["load_average_after"] = os.getloadavg()
    analysis = analyse(config, measured, poll)
    plan = plan_run(config, profile, analysis["startup_s"])
    if render is None:
        write_json(json_out, {"meta": meta, "measured": measured, "analysis": analysis, "plan": plan})
    print(summary(meta, measured, analysis, plan))
