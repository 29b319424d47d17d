"""Peer benchmark: the platform against a hand-rolled FastAPI + diffusers server, same machine, same run.

How it measures, and why:

* The peer is what a new user would write instead of adopting the platform
  (``bench/peer_server.py``): FastAPI + uvicorn + diffusers' own ``ZImagePipeline`` loaded with
  ``from_pretrained``, one pipeline behind a lock, no batching, torch threads at their default,
  the PNG returned inline as ``b64_json``. It runs in its own process.
* The platform is the real Serve app (``build_app`` on a local Ray, SeaweedFS S3, SQLite), with
  its default configuration and the default backend (``onnxruntime``), and the same app on the
  ``torch`` backend: the row where both sides run the same torch model code.
* Same checkpoint files (the tiny checkpoint the platform builds, loaded by both), same requests:
  ``POST /v1/images/generations``, 64×64, Turbo, 8 steps, guidance 0, a seed, a new prompt every
  request (the text encoder always runs), ``response_format: b64_json`` (the platform reads the
  PNG back from S3 and inlines it). Loopback only.
* Closed loop at 1 client and at 32 (saturation), each cell bounded in time (``--duration``) and
  in requests (``--max-requests``). Every cell runs on every system, the order rotating, for
  several rounds, so machine noise lands on all of them; before each run the benchmark waits for
  other processes (not its own) to quieten and records the CPU share they took.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import (
    BENCH_LIMITS,
    BENCH_TENANT,
    REPO,
    BenchCluster,
    CellDuration,
    CellWarmup,
    ClosedLoopReport,
    ClosedLoopRuns,
    ConfigPath,
    JsonOut,
    MaxNoise,
    QuietWait,
    Render,
    Target,
    add_tenant,
    closed_loop,
    fmt_num,
    log,
    markdown_table,
    parse_ints,
    ratio,
    read_json,
    run_meta,
    targets_section,
    wait_all_ready,
    write_json,
)
from bench.services import Lifecycle, free_port

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

HANDROLLED = "hand-rolled"
SIZE = "64x64"
#: The platform at saturation delivers at least this multiple of the hand-rolled server's images/s ...
THROUGHPUT_TARGET = 1.5
#: ... and answers one client within this multiple of its p50.
P50_TARGET = 1.3


def platform_label(backend: str) -> str:
    return f"platform-{backend}"


class HandRolledServer(Lifecycle):
    """``bench/peer_server.py`` in its own process on a free loopback port; stopped by its pid."""

    def __init__(self, checkpoint: Path, log_file: Path) -> None:
        self.checkpoint = checkpoint
        self.log_file = log_file
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        log(f"starting the hand-rolled server on port {self.port} …")
        with self.log_file.open("wb") as out:
            command = [sys.executable, "-m", "bench.peer_server", "--checkpoint", str(self.checkpoint)]
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"the hand-rolled server exited ({self.process.returncode}); see {self.log_file}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"the hand-rolled server was not ready in {timeout_s:.0f} s; see {self.log_file}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Report(ClosedLoopReport):
    """The platform on each backend against the hand-rolled server: images/s and latency per cell."""

    @property
    def systems(self) -> list[str]:
        return [HANDROLLED, *(platform_label(b) for b in self.meta["backends"])]

    def vs_peer(self, label: str, clients: int) -> tuple[float | None, float | None]:
        """``(images/s ÷ the hand-rolled server's, p50 ÷ its p50)`` at ``clients``."""
        size = self.meta["size"]
        return (
            ratio(self.throughput(label, size, clients), self.throughput(HANDROLLED, size, clients)),
            ratio(self.latency(label, size, clients, 50), self.latency(HANDROLLED, size, clients, 50)),
        )

    def targets(self) -> list[Target]:
        one, saturation = min(self.meta["clients"]), max(self.meta["clients"])
        targets = []
        for label in self.systems[1:]:
            targets += [
                Target(
                    f"{label} saturation throughput ({saturation} clients) ÷ hand-rolled",
                    self.vs_peer(label, saturation)[0],
                    THROUGHPUT_TARGET,
                ),
                Target(f"{label} {one}-client p50 ÷ hand-rolled", self.vs_peer(label, one)[1], P50_TARGET, op="≤"),
            ]
        return targets

    def markdown(self) -> str:
        m = self.meta
        size = m["size"]
        rows = []
        for n in m["clients"]:
            for label in self.systems:
                speed, slowness = self.vs_peer(label, n)
                peer = label == HANDROLLED
                rows.append(
                    [
                        label,
                        str(n),
                        self.images_per_s(label, size, n),
                        "—" if peer else fmt_num(speed, ".2f", "×"),
                        *(
                            fmt_num(None if (v := self.latency(label, size, n, q)) is None else v * 1000, ".0f")
                            for q in (50, 95)
                        ),
                        "—" if peer else fmt_num(slowness, ".2f", "×"),
                        *self.errors_and_others(label, size, n),
                    ]
                )
        return "\n".join(
            [
                *self.heading("Peer benchmark", "everything"),
                f"`{HANDROLLED}`: `bench/peer_server.py` (FastAPI + uvicorn + diffusers `ZImagePipeline`, one "
                "pipeline behind a lock, no batching, torch default threads) in its own process. "
                + ", ".join(f"`{platform_label(b)}`" for b in m["backends"])
                + ": the platform's Serve app (`build_app`, default config, SeaweedFS S3, SQLite) on that backend. "
                f"Same tiny checkpoint; {size}, Turbo, 8 steps, a new prompt per request, `b64_json`. Closed loop; "
                f"each cell {m['warmup_s']:.0f} s warm-up + {m['duration_s']:.0f} s measured (at most "
                f"{m['max_requests']} requests), {m['rounds']} rounds, systems rotated. Images/s: images completed "
                "in the windows ÷ window time; latency: requests sent in the windows; others: CPU share of "
                "other processes during the runs (noise).",
                "",
                markdown_table(
                    [
                        "System",
                        "Clients",
                        "Images/s (per round)",
                        "× hand-rolled",
                        "p50 ms",
                        "p95 ms",
                        "p50 × hand-rolled",
                        "Errors",
                        "Others",
                    ],
                    rows,
                ),
                "",
                *targets_section(self.targets()),
            ]
        )


def run_benchmark(
    base: PlatformConfig,
    backends: list[str],
    clients: list[int],
    runs: ClosedLoopRuns,
) -> dict[str, Any]:
    """The platform on each backend and the hand-rolled server, every cell of ``runs`` on each; what
    the report records about the run."""
    started = time.perf_counter()
    with BenchCluster(base) as cluster:
        configs = {}
        for backend in backends:
            config = cluster.platform_config(f"peer-{backend}", f"/peer-{backend}")
            configs[platform_label(backend)] = config.model_copy(
                update={"engine": config.engine.model_copy(update={"backend": backend})}
            )
        first = next(iter(configs.values()))
        key = add_tenant(first, BENCH_TENANT, limits=BENCH_LIMITS)
        urls = {label: cluster.deploy_platform(config) for label, config in configs.items()}
        # deploy_platform built the tiny checkpoint: the hand-rolled server loads the same files.
        with HandRolledServer(first.paths.tiny_checkpoint, cluster.root / "peer-server.log") as peer:
            log("waiting for every system to be ready (engines load and warm up) …")
            peer.wait_ready()
            wait_all_ready(list(urls.values()))
            urls = {HANDROLLED: peer.url, **urls}
            for label, url in urls.items():
                log(f"pre-warming {label} …")
                asyncio.run(
                    closed_loop(
                        url,
                        key,
                        label="prewarm",
                        size=SIZE,
                        clients=4,
                        round_=-1,
                        warmup_s=0,
                        duration_s=3,
                        response_format="b64_json",
                        max_requests=40,
                    )
                )
            ready_s = time.perf_counter() - started
            for round_, n, label in runs.schedule(clients, list(urls)):
                runs.measure(urls[label], key, label, SIZE, n, round_, f"{label:22}")
    from importlib import metadata

    meta = {
        "ready_s": ready_s,
        "quiet_wait_s": runs.quiet_wait_s,
        "wall_s": time.perf_counter() - started,
        "peer_versions": {p: metadata.version(p) for p in ("diffusers", "fastapi", "uvicorn")},
    }
    return meta


def main(
    clients: Annotated[
        str,
        typer.Option(help="Comma-separated concurrent client counts (min: 1-client target, max: saturation target)."),
    ] = "1,32",
    backends: Annotated[str, typer.Option(help="Comma-separated platform backends to run.")] = "onnxruntime,torch",
    rounds: Annotated[int, typer.Option(min=1, help="Times every cell runs on each system.")] = 2,
    duration: CellDuration = 10.0,
    warmup: CellWarmup = 3.0,
    max_requests: Annotated[int, typer.Option(min=1, help="Requests per cell at most (ends the window early).")] = 1000,
    max_noise: MaxNoise = 0.1,
    quiet_wait: QuietWait = 3.0,
    json_out: JsonOut = None,
    config_path: ConfigPath = None,
    render: Render = None,
) -> None:
    """The platform vs a hand-rolled FastAPI + diffusers server on the tiny checkpoint: images/s and p50/p95."""
    if render is not None:
        print(Report.from_json(read_json(render)).markdown())
        return
    from typing import get_args

    from zimage_platform.config import Backend, load_config

    base = load_config(config_path)
    client_list = parse_ints(clients, param="--clients")
    backend_list = [b.strip() for b in backends.split(",") if b.strip()]
    real = [b for b in get_args(Backend) if b not in ("simulated", "tensorrt")]  # what runs on CPUs
    if not backend_list or any(b not in real for b in backend_list):
        raise typer.BadParameter(f"{backends!r}: choose from {', '.join(real)}", param_hint="--backends")
    meta = run_meta(sys.argv[1:])
    runs = ClosedLoopRuns(rounds, warmup, duration, max_noise, quiet_wait, "b64_json", max_requests)
    meta |= run_benchmark(base, backend_list, client_list, runs)
    meta |= {
        "size": SIZE,
        "backends": backend_list,
        "clients": client_list,
        **runs.settings(),
        "load_average_after": os.getloadavg(),
    }
    report = Report(meta, runs.cells, runs.samples)
    print(report.markdown())
    write_json(json_out, report.to_json())
