"""Helpers every benchmark shares: machine facts, noise control, memory readings, Markdown output,
verdicts, and the real platform on a local Ray Serve cluster (for ``serve`` and ``overhead``).

Kept free of heavy imports at module level: benchmarks spawn workers that re-import it.
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Self, TypeVar

import typer

from bench.services import Lifecycle, free_port

if TYPE_CHECKING:
    import httpx
    import psutil
    from ray.serve import Application

    from zimage_platform.config import PlatformConfig, VariantSpec
    from zimage_platform.engines.simulated import SimulatedLatency
    from zimage_platform.storage import SeaweedFS

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1
#: Machine-wide CPU counters tick at 1/CLK_TCK s per core: a run's "others" reading may be off by
#: a tick per core at each end, which alone would make a 50 ms run look noisy.
TICK_SLACK_S = 2 * CORES / os.sysconf("SC_CLK_TCK")


# -- options every benchmark spells the same way ------------------------------------------------

MaxNoise = Annotated[
    float, typer.Option(min=0, max=1, help="CPU share other processes may take while a measurement counts as clean.")
]
QuietWait = Annotated[
    float, typer.Option(min=0, help="Seconds to wait, before each measurement, for other processes to quieten.")
]
JsonOut = Annotated[
    Path | None, typer.Option(help="Write raw samples and the summary here as JSON (a .gz path: gzipped).")
]
ConfigPath = Annotated[Path | None, typer.Option("--config", help="Platform config YAML.")]
Render = Annotated[Path | None, typer.Option(help="Print the tables of an earlier --json-out file; measures nothing.")]
EngineChoice = Annotated[
    str,
    typer.Option(
        "--engine",
        help="`real`: the config's backend on the tiny checkpoint; `simulated`: the benchmarks-only simulated "
        "engine (no model: each batch sleeps the GPU latency model's time, ops/latency/h800-mig.yaml).",
    ),
]
#: A closed-loop cell's measured window and the unmeasured run-up before it (``serve``, ``peer``).
CellDuration = Annotated[float, typer.Option("--duration", min=1, help="Measured seconds per cell and round.")]
CellWarmup = Annotated[float, typer.Option("--warmup", min=0, help="Unmeasured seconds before each window.")]


def quiet_libraries() -> None:
    """Progress bars and load warnings from diffusers/transformers would bury the results."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        module.set_verbosity_error()
        module.disable_progress_bar()


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def machine_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine: what other processes took shows up here too."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_for_quiet(max_noise: float, limit_s: float) -> float:
    """Wait, up to ``limit_s``, until other processes leave the machine quiet; returns the seconds waited.

    Call it while the benchmark's own processes are idle: whatever keeps the cores busy is then
    someone else's work. On a shared 2-core machine one busy neighbour halves the cores and can
    make a 2-thread torch run many times slower: cheaper to wait a little than to measure it.
    """
    import psutil

    start = time.perf_counter()
    while psutil.cpu_percent(interval=0.5) / 100 > max_noise and time.perf_counter() - start < limit_s:
        pass
    return time.perf_counter() - start


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def fmt_num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{suffix}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def report_heading(title: str, meta: dict[str, Any]) -> list[str]:
    """A report's first lines: which benchmark ran when, with which command, on which source."""
    return [f"### {title}, {meta['date']}", "", f"`{meta['command']}` (source {meta['source']})", ""]


def machine_line(meta: dict[str, Any]) -> str:
    """Where a run ran (machine, Python, the packages measured): the start of a report's description."""
    return f"{meta['machine']}; Python {meta['python']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())


def load_average(meta: dict[str, Any]) -> str:
    """How busy the machine was around the run (``run_meta`` reads it before, the command after)."""
    return f"load average {meta['load_average_before'][0]:.2f} before, {meta['load_average_after'][0]:.2f} after."


def wall_time(meta: dict[str, Any], starting: str | None = None) -> str:
    """The run's wall time and what of it went to starting ``starting`` and to waiting for a quiet
    machine (time the figures do not cover), then the load average."""
    parts = [f"{meta['ready_s']:.0f} s starting {starting}"] if starting else []
    parts.append(f"{meta['quiet_wait_s']:.0f} s waiting for a quiet machine")
    return f"Wall time {meta['wall_s']:.0f} s ({', '.join(parts)}); {load_average(meta)}"


def targets_section(targets: list[Target]) -> list[str]:
    """A report's last lines: every target with its verdict."""
    return ["Targets:", "", *(t.line() for t in targets)]


_Item = TypeVar("_Item")
_Block = TypeVar("_Block")


def rotated(items: Sequence[_Item], by: int) -> list[_Item]:
    """``items`` starting at ``by`` (modulo their number): who goes first changes from one block of
    measurements to the next, so a slow spell on the machine lands on every contender alike."""
    by %= len(items)
    return [*items[by:], *items[:by]]


def machine_description() -> str:
    import psutil
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = f"{psutil.cpu_count(logical=False)} physical / {os.cpu_count()} logical cores"
    memory = f"{psutil.virtual_memory().total / 1024**3:.0f} GiB RAM"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {cores}, {memory}, {gpu}, {platform.system()} {platform.release()}"


def source_version() -> str:
    """The commit measured, marked dirty when the working tree differs (read-only git calls)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (dirty)" if git("status", "--porcelain", "--untracked-files=no") else "")


# -- statistics and verdicts --------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), linearly interpolated; ``None`` for no values.

    Interpolated rather than nearest-rank so p99 of a few hundred samples is not simply the maximum.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Target:
    """A measured figure against its target; ``threshold`` ``None`` means shown for reference only."""

    name: str
    measured: float | None
    threshold: float | None
    #: ``"≥"``: higher is better; ``"≤"``: lower is better.
    op: str = "≥"
    unit: str = "×"

    @property
    def verdict(self) -> str:
        if self.threshold is None:
            return "INFO"
        if self.measured is None:
            return "NOT MEASURED"
        met = self.measured >= self.threshold if self.op == "≥" else self.measured <= self.threshold
        return "PASS" if met else "FAIL"

    def line(self) -> str:
        measured = "not measured" if self.measured is None else f"{self.measured:.2f}{self.unit}"
        wanted = "" if self.threshold is None else f" (target {self.op} {self.threshold}{self.unit})"
        return f"- **{self.verdict}** {self.name}: {measured}{wanted}"

    def to_dict(self) -> dict[str, Any]:
        """As a results file keeps it: the figures and the verdict they gave."""
        return asdict(self) | {"verdict": self.verdict}


def parse_ints(text: str, *, param: str, minimum: int = 1) -> list[int]:
    """A comma-separated list of integers, each at least ``minimum`` (a typer option)."""
    import typer

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=param) from None
    if not values or min(values) < minimum:
        raise typer.BadParameter(f"{text!r}: give at least one integer, each at least {minimum}", param_hint=param)
    return values


def parse_sizes(config: PlatformConfig, text: str, *, param: str) -> list[str]:
    """Comma-separated sizes, each one a bucket the ``turbo`` variant serves (typer option)."""
    import typer

    from zimage_platform.errors import PlatformError

    served = config.buckets_for(VARIANT)
    try:
        sizes = [str(served.resolve(s.strip(), param=param)) for s in text.split(",") if s.strip()]
    except PlatformError as exc:
        raise typer.BadParameter(f"{exc.message}; choose from {', '.join(served.names)}", param_hint=param) from None
    if not sizes:
        raise typer.BadParameter("give at least one size", param_hint=param)
    return sizes


# -- CPU taken by others, with the benchmark's own process tree running -------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    """Machine-wide busy CPU seconds and those of this process tree (Ray, its workers, SeaweedFS).

    A served platform never goes fully idle (heartbeats, health checks), so "is the machine
    quiet" has to mean "are *other* processes quiet": the difference of the two readings.
    """

    wall: float
    machine_s: float
    own_s: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        return cls(time.perf_counter(), machine_busy_s(), own_tree_cpu_s())

    def others_share(self, later: CpuSnapshot) -> float:
        """Share of the machine's CPU that processes outside this tree used between the two snapshots."""
        wall = later.wall - self.wall
        if wall <= 0:
            return 0.0
        others = (later.machine_s - self.machine_s) - (later.own_s - self.own_s)
        return max(0.0, others - TICK_SLACK_S) / (wall * CORES)


def _own_tree() -> list[psutil.Process]:
    """This process and every live descendant (Ray, its workers and replicas, SeaweedFS)."""
    import psutil

    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def own_tree_cpu_s() -> float:
    """CPU seconds of this process and every live descendant (children that exited are not counted)."""
    import psutil

    total = 0.0
    for process in _own_tree():
        try:
            times = process.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += times.user + times.system
    return total


def process_name(process: psutil.Process) -> str:
    """A process as a person names it: Ray's title (``ray::ServeController``), a program's name
    (``raylet``, ``weed``), or for Python what it runs (``log_monitor.py``, ``zimage_platform.cli``)."""
    import psutil

    try:
        line = process.cmdline()
    except psutil.Error:
        return "?"
    if not line:
        return "?"
    if line[0].startswith("ray::"):
        return line[0]
    program = Path(line[0]).name
    if not program.startswith("python"):
        return program
    args = iter(line[1:])
    for arg in args:
        if arg == "-m":
            return next(args, program)
        if arg == "-c":
            return f"{program} -c"
        if not arg.startswith("-"):
            return Path(arg).name
    return program


def tree_cpu_s() -> dict[int, tuple[str, float]]:
    """CPU seconds of each live process of this tree (the benchmark, Ray and every worker and
    replica it runs, SeaweedFS): ``pid → (name, seconds)``."""
    import psutil

    readings = {}
    for process in _own_tree():
        try:
            times = process.cpu_times()
            readings[process.pid] = (process_name(process), times.user + times.system)
        except psutil.Error:  # exited meanwhile
            continue
    return readings


def cpu_by_process(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float):
    """Share of one core each process name used between two :func:`tree_cpu_s` readings (a Serve
    replica by its deployment: ``ray::ServeReplica:<app>:Scheduler.<method>`` → ``Scheduler``),
    largest first; processes alive at both readings only."""
    shares: dict[str, float] = {}
    for pid, (name, end) in after.items():
        if pid in before and seconds > 0:
            short = re.sub(r"^ray::ServeReplica:[^:]+:([^.]+).*$", r"\1", name)
            shares[short] = shares.get(short, 0.0) + (end - before[pid][1]) / seconds
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


def wait_for_others_quiet(max_noise: float, limit_s: float) -> float:
    """Like :func:`wait_for_quiet`, but the benchmark's own process tree does not count as noise."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        before = CpuSnapshot.take()
        time.sleep(0.5)
        if before.others_share(CpuSnapshot.take()) <= max_noise:
            break
    return time.perf_counter() - start


def run_meta(command_args: list[str], **extra: Any) -> dict[str, Any]:
    """What every report records about its run: when, what was run, on which machine and source."""
    from datetime import UTC, datetime
    from importlib import metadata

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "-m", "bench", *command_args]),
        "machine": machine_description(),
        "python": platform.python_version(),
        "logical_cores": CORES,
        "load_average_before": os.getloadavg(),
        "versions": {p: metadata.version(p) for p in ("ray", "onnxruntime", "torch", "httpx")},
        "source": source_version(),
        **extra,
    }


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """Raw results, compact: thousands of HTTP samples would make a pretty-printed file megabytes
    (a path ending in ``.gz`` is gzipped: how the larger runs are kept in the repository)."""
    if path is None:
        return
    import gzip
    import json

    def rounded(value: Any) -> Any:  # microseconds are plenty, for durations and epoch times alike
        if isinstance(value, float):
            return round(value, 6)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [rounded(v) for v in value]
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(rounded(data), separators=(",", ":"), default=str) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)
    log(f"raw results: {path}")


def read_json(path: Path) -> Any:
    """A ``--json-out`` file, plain or gzipped (``--render``, ``--from-json``)."""
    import gzip
    import json

    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)


# -- the real platform on Ray Serve, started and stopped by a benchmark -------------------------

ENGINES = ("real", "simulated")
#: What ``--engine simulated`` emulates unless the config says otherwise: the compute model of an
#: H800, one 3g.40gb MIG slice at bf16 (the realtime pool of deploy/config/h800-mig.yaml).
SIMULATED_LATENCY = REPO / "ops" / "latency" / "h800-mig.yaml"
SIMULATED_SLICE, SIMULATED_PRECISION = "3g.40gb", "bf16"

#: Only the ``turbo`` variant is deployed: one engine deployment per app instead of three.
VARIANT = "turbo"
BENCH_TENANT = "bench"
#: Far above any load a benchmark sends: measure the serving path, not the tenant's rate limits.
BENCH_LIMITS = {"requests_per_minute": 1_000_000, "images_per_minute": 1_000_000, "concurrent_jobs": 10_000}
PROMPT = "a lighthouse on a cliff above a stormy sea at night, watercolor"


def with_engine(
    config: PlatformConfig,
    engine: str,
    *,
    slice_: str | None = SIMULATED_SLICE,
    precision: str | None = SIMULATED_PRECISION,
) -> PlatformConfig:
    """``real``: the config as it is; ``simulated``: the simulated engine, acknowledged (this is a
    benchmark), with the config's ``engine.simulated`` settings where it has them, else
    ``slice_``/``precision`` (``None``: each pool's own) and the H800 compute model, by absolute
    path (replicas may run elsewhere)."""
    if engine not in ENGINES:
        raise typer.BadParameter(f"{engine!r}: choose from {', '.join(ENGINES)}", param_hint="--engine")
    if engine == "real":
        return config
    given = config.engine.simulated
    explicit = config.engine.simulated.model_fields_set
    latency = given.latency if "latency" in explicit else SIMULATED_LATENCY
    settings = given.model_copy(
        update={
            "acknowledge_not_real": True,
            "latency": latency.resolve(),
            "slice": given.slice or slice_,
            "precision": given.precision or precision,
        }
    )
    engine_config = config.engine.model_copy(update={"backend": "simulated", "simulated": settings})
    return config.model_copy(update={"engine": engine_config})


def simulated_latency(config: PlatformConfig, pool: str | None = None) -> SimulatedLatency:
    """The latency model one engine replica of ``pool`` (default: the first) sleeps: the figures a
    simulated run is judged against. Built here first, so a bad setting fails before Ray starts."""
    from zimage_platform.engines.simulated import SimulatedLatency

    return SimulatedLatency(config, pool or next(iter(config.pools)), VARIANT)


def engine_meta(config: PlatformConfig) -> dict[str, Any]:
    """What a report records about the engine: its backend and, simulated, what each pool emulates."""
    meta: dict[str, Any] = {"backend": config.engine.backend}
    if config.engine.backend == "simulated":
        meta["simulated_engine"] = {pool: simulated_latency(config, pool).describe() for pool in config.pools}
    return meta


def engine_description(meta: dict[str, Any]) -> str:
    """The engine in a report's words; the simulated engine says so loudly."""
    if meta.get("backend") != "simulated":
        return f"{meta.get('backend')} backend, tiny checkpoint"
    pools = meta.get("simulated_engine") or {}
    emulated = ", ".join(
        f"{pool}: {d['slice'] or 'measured'} {d['precision'] or ''}".strip() for pool, d in pools.items()
    )
    source = Path(next(iter(pools.values()))["latency"]).name if pools else "?"
    return (
        "**SIMULATED engine** (benchmarks only: no model, placeholder images; each batch sleeps the time of "
        f"the latency model `{source}`; {emulated})"
    )


def add_tenant(config: PlatformConfig, tenant_id: str, **spec: Any) -> str:
    """Write ``<first tenant dir>/<id>.yaml`` with one fresh key (its hash only); return the raw key.

    The same file an operator writes, so the platform authenticates the benchmark's requests the
    way it authenticates anyone's.
    """
    from datetime import UTC, datetime

    import yaml

    from zimage_platform.tenancy import issue_key, load_pepper

    key = issue_key(load_pepper(config.tenancy.key_pepper, config.key_pepper_file))
    folder = Path(config.tenancy.dirs[0])
    folder.mkdir(parents=True, exist_ok=True)
    record = {"id": key.key_id, "hash": key.hash, "created_at": datetime.now(UTC).isoformat()}
    body = {"id": tenant_id, "display_name": tenant_id.title(), **spec, "api_keys": [record]}
    (folder / f"{tenant_id}.yaml").write_text(yaml.safe_dump(body))
    return key.raw


class BenchCluster(Lifecycle):
    """SeaweedFS S3, a local Ray and Serve's HTTP proxy, all under ``/tmp/zimage-bench-<pid>``.

    Several Serve applications (platform configurations, bare apps) share the one cluster, so a
    benchmark can alternate between them in one run. ``stop`` (also on errors, via ``with``)
    ends only what ``start`` started, in reverse order, and removes the folder.
    """

    def __init__(self, base: PlatformConfig, *, ray_cpus: int | None = None, keep: bool = False) -> None:
        self.base = base
        self.root = Path(tempfile.gettempdir()) / f"zimage-bench-{os.getpid()}"
        #: Logical CPUs for Ray's bookkeeping (replicas ask for fractions); not a thread count.
        self.ray_cpus = ray_cpus or max(CORES, 4)
        self.keep = keep
        self.port = 0
        self.s3: SeaweedFS | None = None
        self._ray_started = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import secrets

        from ray import serve

        from zimage_platform.serve.launcher import RAY_ENV, init_local_ray
        from zimage_platform.storage import SeaweedFS

        self.root.mkdir(parents=True, exist_ok=False)
        log(f"starting SeaweedFS S3 under {self.root} …")
        access, secret = "bench-" + secrets.token_hex(4), secrets.token_hex(16)
        self.s3 = SeaweedFS(self.root / "s3", access_key=access, secret_key=secret)
        self.s3.start(buckets=(self.base.storage.bucket,))
        # Replicas read S3 credentials from the environment, like boto3 anywhere else; they import
        # the platform (src/) and benchmark code (bare apps) from this checkout: the source measured
        # is the one run_meta records, whichever checkout the virtualenv was installed from.
        pythonpath = os.pathsep.join([str(REPO / "src"), str(REPO)])
        env = {**RAY_ENV, "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "PYTHONPATH": pythonpath}
        os.environ.update(env)
        log("starting Ray and Serve's HTTP proxy …")
        init_local_ray(self.ray_cpus, env)
        self._ray_started = True
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})

    def platform_config(
        self,
        app_name: str,
        route_prefix: str,
        *,
        spec: VariantSpec | None = None,
        max_wait_ms: dict[str, float] | None = None,
    ) -> PlatformConfig:
        """The platform config of one app: shared data folder (checkpoint, tenants, key pepper), own DB.

        Only turbo is served (``spec`` replaces its spec, e.g. another batch profile);
        ``max_wait_ms`` replaces every pool's merge wait.
        """
        assert self.s3 is not None, "start() first"
        base = self.base
        data_dir = self.root / "var"
        pools = base.pools
        if max_wait_ms is not None:
            pools = {name: pool.model_copy(update={"max_wait_ms": max_wait_ms}) for name, pool in pools.items()}
        return base.model_copy(
            update={
                "paths": base.paths.model_copy(update={"data_dir": data_dir}),
                "variants": {VARIANT: spec or base.variant(VARIANT)},
                "pools": pools,
                "storage": base.storage.model_copy(update={"endpoint_url": self.s3.endpoint_url}),
                "database": base.database.model_copy(update={"url": f"sqlite:///{self.root / app_name}.db"}),
                # Not data_dir/tenants: the platform adds that one itself, and a folder listed
                # twice makes the registry refuse every tenant as "defined twice".
                "tenancy": base.tenancy.model_copy(update={"dirs": [self.root / "tenants"]}),
                "serve": base.serve.model_copy(
                    update={"port": self.port, "app_name": app_name, "route_prefix": route_prefix}
                ),
            }
        )

    def deploy_platform(self, config: PlatformConfig) -> str:
        """Engines built, DB migrated, ``build_app(config)`` deployed (not waited for); returns its URL."""
        from zimage_platform.serve.builder import build_app
        from zimage_platform.serve.components import job_store
        from zimage_platform.serve.launcher import prepare_engines

        prepare_engines(config)  # tiny checkpoint, compiled engine (nothing for the simulated engine)
        job_store(config, migrate=True)
        return self.deploy(build_app(config), config.serve.app_name, config.serve.route_prefix)

    def deploy(self, app: Application, name: str, route_prefix: str) -> str:
        from ray import serve

        log(f"deploying {name} at {route_prefix} …")
        serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
        return self.url + route_prefix.rstrip("/")

    def stop(self) -> None:
        import shutil

        try:
            if self._ray_started:
                import ray
                from ray import serve

                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
                    self._ray_started = False
        finally:
            try:
                if self.s3 is not None:
                    self.s3.stop()
            finally:
                if not self.keep:
                    shutil.rmtree(self.root, ignore_errors=True)


def wait_all_ready(urls: list[str], timeout_s: float = 600.0) -> float:
    """Wait until every app answers ``GET <url>/readyz`` with 200 (engines loaded); returns seconds waited."""
    from zimage_platform.serve.launcher import wait_ready

    start = time.perf_counter()
    for url in urls:
        wait_ready(url, timeout_s=max(1.0, timeout_s - (time.perf_counter() - start)))
    return time.perf_counter() - start


# -- HTTP samples and what the job store says about them ----------------------------------------


@dataclass
class HttpSample:
    """One request as the client saw it; ``job`` is filled afterwards from the platform's job store."""

    label: str
    size: str
    round: int
    #: Concurrent clients of the run it belongs to (1: sequential).
    clients: int
    #: Epoch seconds (the platform's DB timestamps use the same clock: one machine).
    sent_at: float
    latency_s: float
    status: int
    job_id: str | None = None
    #: Seconds inside ``engine.run`` as the server reported them (bare app only; platform: see ``job``).
    engine_s: float | None = None
    job: JobTimes | None = None
    #: CPU share other processes took during the block of requests this one belongs to (when measured).
    others: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HttpSample:
        """Rebuild from ``asdict`` output; keys this version does not know are skipped."""
        fields = cls.__dataclass_fields__
        job = JobTimes(**data["job"]) if data.get("job") else None
        return cls(**{k: v for k, v in data.items() if k in fields and k != "job"}, job=job)


@dataclass
class JobTimes:
    """Timestamps (epoch s) and engine figures of a one-image job, read from the job store."""

    created_at: float
    started_at: float | None
    image_done_at: float | None
    finished_at: float | None
    batch_size: int | None
    #: The runner's wall time around ``engine.run`` for the batch, divided by the batch size.
    engine_s: float | None
    #: The pipeline's own stage timings (text encode + denoise + decode + PNG), for this image's batch.
    pipeline_s: float | None


async def timed_post(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[httpx.Response | None, float, float]:
    """``(response or None on a transport error, sent_at epoch s, latency s)``."""
    import httpx

    sent_at, start = time.time(), time.perf_counter()
    try:
        response = await http.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        log(f"request failed: {type(exc).__name__}: {exc}")
        response = None
    latency = time.perf_counter() - start
    if response is not None and response.status_code != 200:
        log(f"HTTP {response.status_code} from {url}: {response.text[:300]}")
    return response, sent_at, latency


def generation_body(tag: str, size: str, seed: int, response_format: str = "url") -> dict[str, Any]:
    """An OpenAI-style images request for turbo at 8 steps; ``tag`` makes the prompt new (text encoder runs)."""
    return {
        "model": "z-image-turbo",
        "prompt": f"{PROMPT} ({tag})",
        "size": size,
        "seed": seed,
        "steps": 8,
        "response_format": response_format,
    }


# -- closed-loop load: N clients, each sends, waits for the answer, sends again -------------------

#: A request slower than this is a failure, not a sample (the platform's own sync timeout is 300 s).
REQUEST_TIMEOUT_S = 300.0


@dataclass
class Cell:
    """One measured closed-loop run: one system (``label``) at one size and concurrency, in one round."""

    label: str
    size: str
    clients: int
    round: int
    #: Epoch seconds where the measured window starts, and its length (shorter than asked when
    #: the run's request bound ended it).
    window_start: float
    duration_s: float
    #: CPU share other processes took during the run (warm-up, window and drain).
    others: float
    quiet_wait_s: float


async def closed_loop(
    url: str,
    key: str,
    *,
    label: str,
    size: str,
    clients: int,
    round_: int,
    warmup_s: float,
    duration_s: float,
    response_format: str = "url",
    max_requests: int | None = None,
) -> tuple[float, float, list[HttpSample]]:
    """``clients`` send-wait-send loops of ``POST <url>/v1/images/generations`` until the window
    ends or ``max_requests`` were sent; ``(window start epoch, window seconds, samples)``.

    A ``b64_json`` answer without an image counts as an error (status 502), whoever sent it.
    """
    import httpx

    samples: list[HttpSample] = []
    window_start = time.time() + warmup_s
    window_end = window_start + duration_s
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    sent = 0

    async def client(http: httpx.AsyncClient, index: int) -> None:
        nonlocal sent, window_end
        mine = 0
        while time.time() < window_end:
            if max_requests is not None and sent >= max_requests:
                window_end = min(window_end, time.time())  # the bound ends the window here
                break
            sent += 1
            tag = f"{label} round {round_} {size} x{clients} client {index} #{mine}"
            body = generation_body(tag, size, seed=index * 100_000 + mine, response_format=response_format)
            response, sent_at, latency = await timed_post(http, f"{url}/v1/images/generations", body, headers)
            status = response.status_code if response is not None else 0
            job_id = None
            if status == 200 and response is not None:
                answer = response.json()
                job_id = answer.get("job_id")
                if response_format == "b64_json" and not (answer.get("data") or [{}])[0].get("b64_json"):
                    log(f"{label}: 200 without an image: {response.text[:200]}")
                    status = 502
            samples.append(HttpSample(label, size, round_, clients, sent_at, latency, status, job_id=job_id))
            mine += 1

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        await asyncio.gather(*(client(http, i) for i in range(clients)))
    return window_start, max(0.0, min(window_end, window_start + duration_s) - window_start), samples


@dataclass
class ClosedLoopRuns:
    """How an alternating closed-loop benchmark (``serve``, ``peer``) measures, and the cells and
    samples it measured: each cell after a quiet spell, with the CPU share other processes took."""

    rounds: int
    warmup_s: float
    duration_s: float
    max_noise: float
    quiet_wait: float
    response_format: str = "url"
    max_requests: int | None = None
    cells: list[Cell] = field(default_factory=list)
    samples: list[HttpSample] = field(default_factory=list)

    def schedule(self, blocks: Sequence[_Block], systems: Sequence[_Item]) -> Iterator[tuple[int, _Block, _Item]]:
        """``(round, block, system)``: every block on every system, round after round, the system
        that goes first rotating, so a noisy spell hits every system alike."""
        for round_ in range(self.rounds):
            for index, block in enumerate(blocks):
                for system in rotated(systems, round_ * len(blocks) + index):
                    yield round_, block, system

    def measure(self, url: str, key: str, label: str, size: str, clients: int, round_: int, shown: str) -> Cell:
        """One cell of ``label`` (the system at ``url``), logged as ``shown`` with what it got."""
        quiet = wait_for_others_quiet(self.max_noise, self.quiet_wait)
        before = CpuSnapshot.take()
        window_start, window_s, got = asyncio.run(
            closed_loop(
                url,
                key,
                label=label,
                size=size,
                clients=clients,
                round_=round_,
                warmup_s=self.warmup_s,
                duration_s=self.duration_s,
                response_format=self.response_format,
                max_requests=self.max_requests,
            )
        )
        others = before.others_share(CpuSnapshot.take())
        cell = Cell(label, size, clients, round_, window_start, window_s, others, quiet)
        self.cells.append(cell)
        self.samples += got
        done = sum(1 for s in got if s.status == 200)
        log(f"round {round_ + 1}/{self.rounds} {shown} x{clients:<3}: {done} images, others {others:.0%}")
        return cell

    def settings(self) -> dict[str, Any]:
        """What a report records about how it measured (``max_requests`` where the cells were bounded)."""
        bound = {} if self.max_requests is None else {"max_requests": self.max_requests}
        return {
            "rounds": self.rounds,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            **bound,
            "max_noise": self.max_noise,
        }

    @property
    def quiet_wait_s(self) -> float:
        """Seconds spent waiting for other processes to quieten, over every cell."""
        return sum(c.quiet_wait_s for c in self.cells)


@dataclass
class ClosedLoopReport(ABC):
    """A closed-loop run's cells and samples, built the same way for a fresh run and a saved one
    (``--render``): throughput counts images completed inside the measured windows ÷ window time;
    latency percentiles and errors count the requests sent inside them."""

    meta: dict[str, Any]
    cells: list[Cell]
    samples: list[HttpSample]

    @abstractmethod
    def targets(self) -> list[Target]:
        """The benchmark's targets, judged on this run."""

    @abstractmethod
    def markdown(self) -> str:
        """The report as the benchmark prints it."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        samples = [HttpSample.from_dict(s) for s in data["samples"]]
        return cls(meta=data["meta"], cells=[Cell(**c) for c in data["cells"]], samples=samples)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "targets": [t.to_dict() for t in self.targets()],
            "cells": [asdict(c) for c in self.cells],
            "samples": [asdict(s) for s in self.samples],
        }

    def cells_of(self, label: str, size: str, clients: int) -> list[Cell]:
        return [c for c in self.cells if (c.label, c.size, c.clients) == (label, size, clients)]

    def samples_of(self, cell: Cell) -> list[HttpSample]:
        return [
            s
            for s in self.samples
            if (s.label, s.size, s.clients, s.round) == (cell.label, cell.size, cell.clients, cell.round)
        ]

    def completed(self, label: str, size: str, clients: int) -> list[HttpSample]:
        """Successful requests that finished inside a measured window (what throughput counts)."""
        return [
            s
            for c in self.cells_of(label, size, clients)
            for s in self.samples_of(c)
            if s.status == 200 and c.window_start <= s.sent_at + s.latency_s <= c.window_start + c.duration_s
        ]

    def sent(self, label: str, size: str, clients: int) -> list[HttpSample]:
        """Requests sent inside a measured window (what latency percentiles and errors use)."""
        return [
            s
            for c in self.cells_of(label, size, clients)
            for s in self.samples_of(c)
            if c.window_start <= s.sent_at <= c.window_start + c.duration_s
        ]

    def throughput(self, label: str, size: str, clients: int) -> float | None:
        """Images per second over all rounds' windows together."""
        window = sum(c.duration_s for c in self.cells_of(label, size, clients))
        return len(self.completed(label, size, clients)) / window if window else None

    def round_throughputs(self, label: str, size: str, clients: int) -> list[float]:
        """Images per second of each round's window (how much the rounds disagree)."""
        return [
            sum(
                1
                for s in self.samples_of(c)
                if s.status == 200 and 0 <= s.sent_at + s.latency_s - c.window_start <= c.duration_s
            )
            / c.duration_s
            for c in self.cells_of(label, size, clients)
            if c.duration_s
        ]

    def latency(self, label: str, size: str, clients: int, q: float) -> float | None:
        return percentile([s.latency_s for s in self.sent(label, size, clients) if s.status == 200], q)

    def errors(self, label: str, size: str, clients: int) -> str:
        sent = self.sent(label, size, clients)
        return f"{sum(s.status != 200 for s in sent)}/{len(sent)}"

    def others(self, label: str, size: str, clients: int) -> float | None:
        cells = self.cells_of(label, size, clients)
        return statistics.mean(c.others for c in cells) if cells else None

    def heading(self, title: str, starting: str) -> list[str]:
        """The report's first lines: the run, the machine, and what of the wall time went to
        starting ``starting`` and to quiet waits."""
        return [*report_heading(title, self.meta), f"{machine_line(self.meta)}. {wall_time(self.meta, starting)}", ""]

    def images_per_s(self, label: str, size: str, clients: int) -> str:
        """The "Images/s (per round)" column: over every round's window, then each round's."""
        per_round = ", ".join(f"{t:.1f}" for t in self.round_throughputs(label, size, clients))
        return f"{fmt_num(self.throughput(label, size, clients), '.1f')} ({per_round})"

    def errors_and_others(self, label: str, size: str, clients: int) -> list[str]:
        """The "Errors" and "Others" columns: failed requests, and the CPU share other processes
        took meanwhile (noise)."""
        return [self.errors(label, size, clients), fmt_num(self.others(label, size, clients), ".0%")]


def attach_job_times(config: PlatformConfig, samples: list[HttpSample]) -> None:
    """Fill in each sample's ``job`` from the job store of the app that answered it (``config``)."""
    times = read_job_times(config, [s.job_id for s in samples if s.job_id])
    for s in samples:
        if s.job_id:
            s.job = times.get(s.job_id)


def read_job_times(config: PlatformConfig, job_ids: list[str]) -> dict[str, JobTimes]:
    """Job and image rows of ``job_ids`` from the app's database (read after the load, never during it)."""
    from sqlalchemy import select

    from zimage_platform.db import create_db_engine, session_factory
    from zimage_platform.scheduling.models import JobImageRow, JobRow

    def epoch(value: Any) -> float | None:
        return value.timestamp() if value is not None else None

    engine = create_db_engine(config.database_url)
    found: dict[str, JobTimes] = {}
    try:
        with session_factory(engine)() as session:
            for start in range(0, len(job_ids), 500):
                chunk = job_ids[start : start + 500]
                for job in session.scalars(select(JobRow).where(JobRow.id.in_(chunk))):
                    image: JobImageRow | None = job.images[0] if job.images else None
                    timings = (image.timings or []) if image is not None else []
                    found[job.id] = JobTimes(
                        created_at=job.created_at.timestamp(),
                        started_at=epoch(job.started_at),
                        image_done_at=epoch(image.finished_at) if image else None,
                        finished_at=epoch(job.finished_at),
                        batch_size=image.batch_size if image else None,
                        engine_s=image.engine_s if image else None,
                        pipeline_s=sum(p["total_s"] for p in timings) if timings else None,
                    )
    finally:
        engine.dispose()
    return found


# -- open-loop load and what became of it -------------------------------------------------------


async def open_loop(
    schedule: list[tuple[float, Any]],
    send: Callable[[httpx.AsyncClient, int, Any], Awaitable[Any]],
    *,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> list[tuple[float, Any]]:
    """Open loop: ``send(http, index, item)`` for each ``(at, item)`` of ``schedule``, ``at``
    seconds after the start, whether or not earlier requests have been answered (arrivals do not
    wait for the system, unlike closed-loop clients). Returns ``(sent, result)`` in schedule
    order, ``sent`` in seconds from the start."""
    import httpx

    limits = httpx.Limits(max_connections=len(schedule) + 1, max_keepalive_connections=64)
    start = time.perf_counter()

    async def one(http: httpx.AsyncClient, index: int, at: float, item: Any) -> tuple[float, Any]:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter() - start
        return sent, await send(http, index, item)

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        return list(await asyncio.gather(*(one(http, i, at, item) for i, (at, item) in enumerate(schedule))))


@dataclass
class TenantOutcomes:
    """Every job of some tenants as the job store and the ledger have them."""

    #: Job id → status.
    jobs: dict[str, str]
    images_requested: int
    images_done: int
    ledger_rows: int

    @property
    def open(self) -> int:
        return sum(1 for s in self.jobs.values() if s not in ("succeeded", "failed", "cancelled"))


def tenant_outcomes(config: PlatformConfig, tenants: list[str]) -> TenantOutcomes:
    """Jobs, images done and ledger rows of ``tenants`` in the app's database (nothing accepted may
    be lost: every job row is an accepted job, and each delivered image is one ledger row)."""
    from sqlalchemy import func, select

    from zimage_platform.billing.ledger import LedgerEntryRow
    from zimage_platform.db import create_db_engine, session_factory
    from zimage_platform.scheduling.models import JobImageRow, JobRow

    engine = create_db_engine(config.database_url)
    try:
        with session_factory(engine)() as s:
            rows = s.execute(select(JobRow.id, JobRow.status, JobRow.n).where(JobRow.tenant_id.in_(tenants))).all()
            done = s.scalar(
                select(func.count())
                .select_from(JobImageRow)
                .join(JobRow, JobRow.id == JobImageRow.job_id)
                .where(JobRow.tenant_id.in_(tenants), JobImageRow.status == "done")
            )
            ledger = s.scalar(
                select(func.count()).select_from(LedgerEntryRow).where(LedgerEntryRow.tenant_id.in_(tenants))
            )
    finally:
        engine.dispose()
    return TenantOutcomes(
        jobs={job: status for job, status, _ in rows},
        images_requested=sum(n for _, _, n in rows),
        images_done=done or 0,
        ledger_rows=ledger or 0,
    )
