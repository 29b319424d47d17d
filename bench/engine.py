"""Engine benchmark: torch eager vs ONNX Runtime (optionally torch.compile) on the tiny checkpoint.

How it measures, and why:

* Every number goes end to end through ``PipelineEngine.run`` with the variant's own defaults
  (turbo: 8 steps, guidance 0), built by the same ``resolve_requests`` the CLI and HTTP use.
  The pipeline's denoiser is wrapped to also time the transformer forwards alone.
* Each backend lives in its own spawned process, so its peak RSS (``ru_maxrss``) is its own.
  All processes load and warm up first (one after another), then the parent hands out one case
  at a time, alternating backends and rotating who goes first, so a noisy neighbour on a small
  machine slows every backend alike instead of whichever happened to be running.
* Prompts: the embedding cache is never cleared. "cold prompt" runs use prompts that process
  has never seen (the text encoder runs for every member); "cached prompt" repeats the same
  requests at once (every prompt a cache hit). The cache's miss counter checks both.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cached_property
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from bench.common import (
    CORES,
    MIB,
    TICK_SLACK_S,
    ConfigPath,
    JsonOut,
    MaxNoise,
    QuietWait,
    Render,
    Target,
    fmt_num,
    load_average,
    log,
    machine_busy_s,
    machine_description,
    machine_line,
    markdown_table,
    parse_ints,
    parse_sizes,
    peak_rss_bytes,
    quiet_libraries,
    ratio,
    read_json,
    rotated,
    rss_bytes,
    source_version,
    targets_section,
    wait_for_quiet,
)
from zimage_platform.config import PlatformConfig, load_config
from zimage_platform.errors import PlatformError
from zimage_platform.pipeline.buckets import Resolution

if TYPE_CHECKING:
    import torch

    from zimage_platform.pipeline.pipeline import Denoiser, ZImageBatchPipeline
    from zimage_platform.pipeline.types import GenerationRequest

VARIANT = "turbo"
#: What a prompt looks like to the text encoder; a per-run tag after it makes each one new.
PROMPT = "a lighthouse on a cliff above a stormy sea at night, watercolor"
PromptMode = Literal["cold", "cached"]
PROMPT_MODES: tuple[PromptMode, ...] = ("cold", "cached")
#: Prompt tags of the warm-up runs: two caption lengths (see ``Worker.warm_up``).
WARMUP_TAGS = ("warm-up", "warm-up, second caption length")
#: The targets: ONNX Runtime per-image speed-up over torch eager, and batching gain, at one size.
TARGET_SIZE = "256x256"
ORT_SPEEDUP_TARGET = 1.5
BATCH_GAIN_TARGET = 1.6
GAIN_BATCH = 4
#: Seconds a worker may take to load and warm up, and to answer one case (a hung child fails the run).
READY_TIMEOUT_S = 600.0
CASE_TIMEOUT_S = 600.0


# -- what is measured ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """What one worker process runs: a backend, optionally with its transformer under torch.compile."""

    label: str
    backend: str
    compile: bool = False


TORCH = Contender("torch", "torch")
ONNXRUNTIME = Contender("onnxruntime", "onnxruntime")
TORCH_COMPILE = Contender("torch.compile", "torch", compile=True)


@dataclass(frozen=True)
class Case:
    size: str
    batch: int


@dataclass
class Sample:
    """One timed ``PipelineEngine.run`` call."""

    contender: str
    size: str
    batch: int
    prompt: PromptMode
    round: int
    seconds: float
    text_encode_s: float
    decode_s: float
    denoiser_calls: int
    denoiser_rows: int
    denoiser_s: float
    #: CPU seconds of this worker process, and of everything else on the machine, during the run.
    cpu_s: float
    others_cpu_s: float

    @property
    def s_per_image(self) -> float:
        return self.seconds / self.batch

    @property
    def forwards_per_s(self) -> float:
        """Denoiser forwards (one per image per step) per second of denoiser time."""
        return self.denoiser_rows / self.denoiser_s

    @property
    def noise(self) -> float:
        """Share of the machine's CPU other processes took during the run, beyond counter resolution."""
        return max(0.0, self.others_cpu_s - TICK_SLACK_S) / (self.seconds * CORES)

    def to_dict(self) -> dict[str, Any]:
        derived = {"s_per_image": self.s_per_image, "forwards_per_s": self.forwards_per_s, "noise": self.noise}
        return asdict(self) | derived


@dataclass
class WorkerInfo:
    """A worker process's setup and memory; sent when ready and again, with the final peak, at the end."""

    contender: str
    pid: int
    load_s: float
    warmup_s: float
    idle_cpu_s: float
    rss_after_load_bytes: int
    peak_rss_bytes: int
    config_threads: int
    torch_threads: int
    torch_interop_threads: int
    os_threads: int


# -- the child side -----------------------------------------------------------------------------


class TimedDenoiser:
    """Stands in for the pipeline's denoiser to add up forward rows and the seconds spent in them."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.rows = 0
        self.seconds = 0.0

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, captions: list[torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        velocity = self.inner(latents, timestep, captions)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.rows += latents.shape[0]
        return velocity


def _compile_transformer(pipeline: ZImageBatchPipeline) -> None:
    import torch

    # TorchDenoiser calls the module it holds; swapping that module is the only hook there is.
    pipeline.denoiser.transformer = torch.compile(pipeline.pipe.transformer)  # type: ignore[attr-defined]


class Worker:
    """One loaded engine in its own process, measured case by case when the parent asks."""

    def __init__(self, contender: Contender, config: PlatformConfig) -> None:
        from zimage_platform.engines import PipelineEngine

        self.contender = contender
        self.config = config
        start = time.perf_counter()
        self.engine = PipelineEngine(config, VARIANT, contender.backend)
        self.engine.load()
        pipeline = self.engine.pipeline
        assert pipeline is not None
        if contender.compile:
            _compile_transformer(pipeline)
        self.denoiser = TimedDenoiser(pipeline.denoiser)
        pipeline.denoiser = self.denoiser
        self.pipeline = pipeline
        self.load_s = time.perf_counter() - start
        self.rss_after_load = rss_bytes()
        self.warmup_s = 0.0
        #: CPU burnt between measurements (spinning thread pools would steal from the other worker).
        self.idle_cpu_s = 0.0
        self._idle_since = time.process_time()

    def warm_up(self, cases: Iterable[Case]) -> None:
        """Single-step runs per case, so first-call allocations (and compiles) are not measured.

        Two caption lengths per case: torch.compile recompiles on the second length it sees, with
        that dimension dynamic from then on, so no later prompt triggers a compile mid-measurement.
        """
        start = time.perf_counter()
        for case in cases:
            for tag in WARMUP_TAGS:
                self.engine.run(self._requests(case, tag, steps=1))
        self.warmup_s = time.perf_counter() - start
        self._idle_since = time.process_time()

    def measure(self, case: Case, round_: int) -> list[Sample]:
        self.idle_cpu_s += time.process_time() - self._idle_since
        requests = self._requests(case, f"round {round_}")
        samples = [self._timed(requests, mode, round_) for mode in PROMPT_MODES]
        self._idle_since = time.process_time()
        return samples

    def info(self) -> WorkerInfo:
        import psutil
        import torch

        return WorkerInfo(
            contender=self.contender.label,
            pid=os.getpid(),
            load_s=self.load_s,
            warmup_s=self.warmup_s,
            idle_cpu_s=self.idle_cpu_s,
            rss_after_load_bytes=self.rss_after_load,
            peak_rss_bytes=peak_rss_bytes(),
            config_threads=self.config.engine.threads,
            torch_threads=torch.get_num_threads(),
            torch_interop_threads=torch.get_num_interop_threads(),
            os_threads=psutil.Process().num_threads(),
        )

    def _requests(self, case: Case, tag: str, *, steps: int | None = None) -> list[GenerationRequest]:
        """``case.batch`` requests with the variant's defaults, each with its own seed and new prompt."""
        from zimage_platform.pipeline.params import GenerationParams, resolve_requests

        spec, buckets = self.config.variant(VARIANT), self.config.buckets_for(VARIANT)
        return [
            resolve_requests(
                GenerationParams(
                    prompt=f"{PROMPT} ({tag}, {case.size}, batch {case.batch} #{i})",
                    size=case.size,
                    seed=i,
                    steps=steps,
                ),
                spec,
                buckets,
            )[0]
            for i in range(case.batch)
        ]

    def _timed(self, requests: Sequence[GenerationRequest], mode: PromptMode, round_: int) -> Sample:
        cache = self.pipeline.prompt_cache
        misses = cache.stats.misses
        self.denoiser.reset()
        start, cpu, busy = time.perf_counter(), time.process_time(), machine_busy_s()
        results = self.engine.run(requests)
        seconds = time.perf_counter() - start
        cpu, busy = time.process_time() - cpu, machine_busy_s() - busy
        # The cold/cached split is the method, so check it rather than trust it.
        encoded, expected = cache.stats.misses - misses, len(requests) if mode == "cold" else 0
        if encoded != expected:
            raise RuntimeError(f"{mode} prompt run encoded {encoded} prompts, expected {expected}")
        timings = results[0].passes[0]
        return Sample(
            contender=self.contender.label,
            size=str(requests[0].size),
            batch=len(requests),
            prompt=mode,
            round=round_,
            seconds=seconds,
            text_encode_s=timings.text_encode_s,
            decode_s=timings.decode_s,
            denoiser_calls=self.denoiser.calls,
            denoiser_rows=self.denoiser.rows,
            denoiser_s=self.denoiser.seconds,
            cpu_s=cpu,
            others_cpu_s=max(0.0, busy - cpu),
        )


def _worker_main(conn: Connection, contender: Contender, config: PlatformConfig, cases: list[Case]) -> None:
    """Child entry point: load and warm up, then measure one ``(case, round)`` per message until ``None``."""
    try:
        quiet_libraries()
        worker = Worker(contender, config)
        worker.warm_up(cases)
        conn.send(("ready", worker.info()))
        while (message := conn.recv()) is not None:
            case, round_ = message
            conn.send(("samples", worker.measure(case, round_)))
        conn.send(("done", worker.info()))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# -- the parent side ----------------------------------------------------------------------------


class WorkerFailed(RuntimeError):
    """A worker raised (``detail`` is its traceback), died, or did not answer in time."""

    def __init__(self, label: str, detail: str) -> None:
        super().__init__(f"{label}: {detail}")
        self.detail = detail


class WorkerHandle:
    """The parent's end of one worker process."""

    def __init__(self, contender: Contender, config: PlatformConfig, cases: list[Case]) -> None:
        ctx = mp.get_context("spawn")
        self.contender = contender
        self.conn, child = ctx.Pipe()
        # Not a daemon: inductor (torch.compile) starts compile workers of its own.
        self.process = ctx.Process(
            target=_worker_main, args=(child, contender, config, cases), name=f"bench-{contender.label}"
        )
        self.process.start()
        child.close()

    def receive(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise WorkerFailed(self.contender.label, f"no answer within {timeout:.0f} s")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise WorkerFailed(self.contender.label, f"exited with code {self.process.exitcode}") from None
        if kind == "error":
            raise WorkerFailed(self.contender.label, payload)
        return payload

    def request(self, message: tuple[Case, int] | None, timeout: float) -> Any:
        self.conn.send(message)
        return self.receive(timeout)

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(10)
        self.conn.close()


@dataclass
class RunResult:
    workers: list[WorkerInfo]
    samples: list[Sample]
    #: Contenders dropped (only torch.compile may be), with the reason.
    skipped: dict[str, str]
    quiet_wait_s: float


def run_benchmark(
    config: PlatformConfig,
    contenders: Sequence[Contender],
    cases: list[Case],
    *,
    repeats: int,
    compile_timeout: float,
    max_noise: float,
    quiet_wait: float,
) -> RunResult:
    """Start one worker per contender, then alternate cases between them, each case after a quiet spell."""
    handles: list[WorkerHandle] = []
    infos: dict[str, WorkerInfo] = {}
    skipped: dict[str, str] = {}
    samples: list[Sample] = []
    waited = 0.0
    try:
        # One at a time, so loads and warm-ups (and compiles) do not compete for the cores.
        for contender in contenders:
            log(f"loading and warming up {contender.label}…")
            handle = WorkerHandle(contender, config, cases)
            handles.append(handle)
            try:
                info = handle.receive(compile_timeout if contender.compile else READY_TIMEOUT_S)
            except WorkerFailed as exc:
                if not contender.compile:
                    raise
                handle.close()
                handles.remove(handle)
                skipped[contender.label] = f"load and warm-up (compiling): {_exception_line(exc.detail)}"
                log(f"skipping {contender.label}: {skipped[contender.label]}")
                continue
            infos[contender.label] = info
            log(f"  ready: load {info.load_s:.1f} s, warm-up {info.warmup_s:.1f} s")
        start = time.perf_counter()
        for round_ in range(repeats):
            for index, case in enumerate(cases):
                waited += wait_for_quiet(max_noise, quiet_wait)
                for handle in rotated(handles, round_ * len(cases) + index):
                    samples += handle.request((case, round_), CASE_TIMEOUT_S)
            log(f"round {round_ + 1}/{repeats} done ({time.perf_counter() - start:.0f} s)")
        for handle in handles:
            infos[handle.contender.label] = handle.request(None, CASE_TIMEOUT_S)
    finally:
        for handle in handles:
            handle.close()
    return RunResult([infos[c.label] for c in contenders if c.label in infos], samples, skipped, waited)


def _exception_line(text: str) -> str:
    """The last non-empty line of a traceback: the exception itself."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


# -- results ------------------------------------------------------------------------------------


@dataclass
class Report:
    """One run's summaries; built the same way for a fresh run and a saved one (``--render``)."""

    meta: dict[str, Any]
    workers: list[WorkerInfo]
    samples: list[Sample]
    skipped: dict[str, str]

    @cached_property
    def _groups(self) -> dict[tuple[str, str, int], list[Sample]]:
        groups: dict[tuple[str, str, int], list[Sample]] = defaultdict(list)
        for s in self.samples:
            groups[(s.contender, s.size, s.batch)].append(s)
        return groups

    def runs(self, contender: str, size: str, batch: int) -> tuple[list[Sample], list[Sample]]:
        """(clean, all) runs of one case: clean ones had other processes under ``max_noise``."""
        found = self._groups.get((contender, size, batch), [])
        return [s for s in found if s.noise <= self.meta["max_noise"]], found

    def _clean_of(self, contender: str, case: Case) -> str:
        clean, found = self.runs(contender, case.size, case.batch)
        return f"{len(clean)}/{len(found)}"

    def _median(
        self, contender: str, size: str, batch: int, value: Callable[[Sample], float], prompt: str | None = None
    ) -> float | None:
        """Median over the clean runs; over all of them when none was clean (the table says how many were)."""
        clean, found = ([s for s in runs if prompt in (None, s.prompt)] for runs in self.runs(contender, size, batch))
        values = [value(s) for s in (clean or found)]
        return statistics.median(values) if values else None

    def s_per_image(self, contender: str, size: str, batch: int, prompt: PromptMode) -> float | None:
        return self._median(contender, size, batch, lambda s: s.s_per_image, prompt)

    def forwards_per_s(self, contender: str, size: str, batch: int) -> float | None:
        return self._median(contender, size, batch, lambda s: s.forwards_per_s)

    def speedup(self, contender: str, size: str, batch: int, prompt: PromptMode) -> float | None:
        """How many times faster per image than torch eager."""
        return ratio(
            self.s_per_image(TORCH.label, size, batch, prompt), self.s_per_image(contender, size, batch, prompt)
        )

    def batch_gain(self, contender: str, size: str, prompt: PromptMode) -> float | None:
        """Batch-of-4 throughput over four single runs: single s/img ÷ batched s/img."""
        return ratio(
            self.s_per_image(contender, size, 1, prompt), self.s_per_image(contender, size, GAIN_BATCH, prompt)
        )

    @property
    def contenders(self) -> list[str]:
        return [w.contender for w in self.workers]

    @property
    def cases(self) -> list[Case]:
        return [Case(**c) for c in self.meta["cases"]]

    def targets(self) -> list[Target]:
        at = f"at {TARGET_SIZE}"
        targets: list[Target] = []
        for prompt in PROMPT_MODES:
            targets.append(
                Target(
                    f"onnxruntime vs torch eager per image {at} batch 1 ({prompt} prompt)",
                    self.speedup(ONNXRUNTIME.label, TARGET_SIZE, 1, prompt),
                    ORT_SPEEDUP_TARGET,
                )
            )
            for contender in self.contenders:
                targets.append(
                    Target(
                        f"{contender} batch-{GAIN_BATCH} throughput vs {GAIN_BATCH} single runs {at} ({prompt} prompt)",
                        self.batch_gain(contender, TARGET_SIZE, prompt),
                        BATCH_GAIN_TARGET if contender == ONNXRUNTIME.label else None,
                    )
                )
        # Not a target: shows how much of the end-to-end gap is the denoiser's.
        targets.append(
            Target(
                f"onnxruntime vs torch eager denoiser forwards/s {at} batch 1 (denoiser calls only)",
                ratio(
                    self.forwards_per_s(ONNXRUNTIME.label, TARGET_SIZE, 1),
                    self.forwards_per_s(TORCH.label, TARGET_SIZE, 1),
                ),
                None,
            )
        )
        return targets

    def _cpu_use(self, contender: str) -> tuple[str, str]:
        """Cores the worker kept busy, and the machine share other processes took, over its runs."""
        mine = [s for s in self.samples if s.contender == contender]
        wall = sum(s.seconds for s in mine)
        if not wall:
            return "n/a", "n/a"
        own = sum(s.cpu_s for s in mine) / wall
        others = sum(s.others_cpu_s for s in mine) / (wall * CORES)
        return f"{own:.2f}", f"{others:.0%}"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from ``to_json`` output (derived fields are recomputed, not read)."""
        fields = Sample.__dataclass_fields__
        return cls(
            meta=data["meta"],
            workers=[WorkerInfo(**w) for w in data["workers"]],
            samples=[Sample(**{k: v for k, v in s.items() if k in fields}) for s in data["samples"]],
            skipped=data["skipped"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "workers": [asdict(w) for w in self.workers],
            "skipped": self.skipped,
            "targets": [t.to_dict() for t in self.targets()],
            "samples": [s.to_dict() for s in self.samples],
        }

    def markdown(self) -> str:
        m = self.meta
        lines = [
            f"### Engine benchmark, {m['date']}",
            "",
            f"`{m['command']}` (source {m['source']}, ONNX opset {m['onnx_engine']['opset']})",
            "",
            f"{machine_line(m)}. Variant `{VARIANT}` on the tiny checkpoint: {m['steps']} steps, "
            f"guidance {m['guidance']}, {m['sampler']}. Median of {m['repeats']} alternated repeats over the clean "
            f"runs (other processes under {m['max_noise']:.0%} of the CPU; all runs when none was); wall time "
            f"{m['wall_s']:.0f} s, {m['quiet_wait_s']:.0f} s of it waiting for a quiet machine; {load_average(m)}",
            "",
            markdown_table(
                [
                    "Backend",
                    "Size",
                    "Batch",
                    "s/img cold prompt",
                    "s/img cached prompt",
                    "Denoiser fwd/s",
                    "vs torch",
                    "Clean runs",
                ],
                [
                    [
                        contender,
                        case.size,
                        str(case.batch),
                        fmt_num(self.s_per_image(contender, case.size, case.batch, "cold"), ".3f"),
                        fmt_num(self.s_per_image(contender, case.size, case.batch, "cached"), ".3f"),
                        fmt_num(self.forwards_per_s(contender, case.size, case.batch), ".1f"),
                        fmt_num(self.speedup(contender, case.size, case.batch, "cached"), ".2f", "×"),
                        self._clean_of(contender, case),
                    ]
                    for case in self.cases
                    for contender in self.contenders
                ],
            ),
            "",
            "Where the time goes, s/img (medians; text encoder from cold-prompt runs, the rest from cached):",
            "",
            markdown_table(
                ["Backend", "Size", "Batch", "Text encoder", f"Denoiser ({m['steps']} steps)", "VAE decode", "Rest"],
                [
                    [
                        contender,
                        case.size,
                        str(case.batch),
                        *(
                            fmt_num(self._median(contender, case.size, case.batch, f, prompt), ".3f")
                            for f, prompt in STAGES
                        ),
                    ]
                    for case in self.cases
                    for contender in self.contenders
                ],
            ),
        ]
        sizes = sorted({c.size for c in self.cases}, key=lambda s: [c.size for c in self.cases].index(s))
        batches = {c.batch for c in self.cases}
        if {1, GAIN_BATCH} <= batches:
            lines += [
                "",
                f"Batch-{GAIN_BATCH} throughput ÷ {GAIN_BATCH} single runs (cached prompt; cold in brackets):",
                "",
                markdown_table(
                    ["Backend", *sizes],
                    [
                        [
                            contender,
                            *(
                                f"{fmt_num(self.batch_gain(contender, size, 'cached'), '.2f', '×')} "
                                f"({fmt_num(self.batch_gain(contender, size, 'cold'), '.2f', '×')})"
                                for size in sizes
                            ),
                        ]
                        for contender in self.contenders
                    ],
                ),
            ]
        lines += [
            "",
            "Per backend process. Threads: config `engine.threads` / torch intra-op / torch inter-op / OS "
            "threads of the process. Cores busy: the worker's CPU seconds per second of its runs; "
            "others: CPU share other processes took meanwhile (noise); idle CPU: what the worker burnt "
            "while another one was measured.",
            "",
            markdown_table(
                [
                    "Backend",
                    "Peak RSS MiB",
                    "RSS after load MiB",
                    "Load s",
                    "Warm-up s",
                    "Threads",
                    "Cores busy",
                    "Others",
                    "Idle CPU s",
                ],
                [
                    [
                        w.contender,
                        f"{w.peak_rss_bytes / MIB:.0f}",
                        f"{w.rss_after_load_bytes / MIB:.0f}",
                        f"{w.load_s:.1f}",
                        f"{w.warmup_s:.1f}",
                        f"{w.config_threads} / {w.torch_threads} / {w.torch_interop_threads} / {w.os_threads}",
                        *self._cpu_use(w.contender),
                        f"{w.idle_cpu_s:.1f}",
                    ]
                    for w in self.workers
                ],
            ),
            "",
            *targets_section(self.targets()),
            *(f"- **SKIPPED** {label}: {reason}" for label, reason in self.skipped.items()),
        ]
        return "\n".join(lines)


#: Per-image seconds of each pipeline stage, and the prompt mode it is read from.
STAGES: tuple[tuple[Callable[[Sample], float], PromptMode], ...] = (
    (lambda s: s.text_encode_s / s.batch, "cold"),
    (lambda s: s.denoiser_s / s.batch, "cached"),
    (lambda s: s.decode_s / s.batch, "cached"),
    (lambda s: (s.seconds - s.text_encode_s - s.denoiser_s - s.decode_s) / s.batch, "cached"),
)


# -- the command --------------------------------------------------------------------------------


def _parse_cases(config: PlatformConfig, buckets: str, batches: str) -> list[Case]:
    spec = config.variant(VARIANT)
    sizes = parse_sizes(config, buckets, param="--buckets")
    counts = parse_ints(batches, param="--batches")
    for size in sizes:
        limit = spec.batch.for_bucket(Resolution.parse(size))
        for count in counts:
            if count > limit:
                raise typer.BadParameter(f"batch {count} at {size} is outside 1..{limit}", param_hint="--batches")
    return [Case(size, count) for size in sizes for count in counts]


def main(
    repeats: Annotated[
        int, typer.Option(min=1, help="Measured rounds per case (each case runs cold, then cached).")
    ] = 5,
    buckets: Annotated[str, typer.Option(help="Comma-separated buckets.")] = "64x64,128x128,256x256,512x512",
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,4",
    json_out: JsonOut = None,
    compile_: Annotated[
        bool, typer.Option("--compile", help="Add a torch.compile worker (skipped if its warm-up is too slow).")
    ] = False,
    compile_timeout: Annotated[float, typer.Option(help="Seconds the torch.compile warm-up may take.")] = 180.0,
    max_noise: MaxNoise = 0.1,
    quiet_wait: QuietWait = 5.0,
    config_path: ConfigPath = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Override paths.data_dir (default from the config: var/).")
    ] = None,
    render: Render = None,
) -> None:
    """Torch eager vs ONNX Runtime on the tiny checkpoint: s/img, denoiser forwards/s, peak RSS."""
    if render is not None:
        print(Report.from_json(read_json(render)).markdown())
        return
    try:
        config = load_config(config_path)
        if data_dir is not None:
            config.paths = config.paths.model_copy(update={"data_dir": data_dir})
        cases = _parse_cases(config, buckets, batches)
        log("checking the onnxruntime engine (built on first use)…")
        from zimage_platform.engines import build_engine

        manifest = build_engine(config, VARIANT, ONNXRUNTIME.backend)
    except PlatformError as exc:
        log(f"error [{exc.code}]: {exc.message}")
        raise typer.Exit(2) from None
    contenders = [TORCH, ONNXRUNTIME, *([TORCH_COMPILE] if compile_ else [])]
    spec = config.variant(VARIANT)
    started, load_before = time.perf_counter(), os.getloadavg()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        run = run_benchmark(
            config,
            contenders,
            cases,
            repeats=repeats,
            compile_timeout=compile_timeout,
            max_noise=max_noise,
            quiet_wait=quiet_wait,
        )
    except WorkerFailed as exc:
        log(f"benchmark failed: {exc}")
        raise typer.Exit(1) from None
    report = Report(
        meta={
            "date": date,
            "command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
            "machine": machine_description(),
            "python": platform.python_version(),
            "logical_cores": CORES,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "versions": {p: metadata.version(p) for p in ("torch", "onnxruntime", "diffusers")},
            "variant": VARIANT,
            "steps": spec.defaults.steps,
            "guidance": spec.defaults.guidance,
            "sampler": spec.defaults.sampler,
            "repeats": repeats,
            "max_noise": max_noise,
            "quiet_wait_s": run.quiet_wait_s,
            "cases": [asdict(c) for c in cases],
            "source": source_version(),
            "onnx_engine": {
                "opset": manifest.onnx_opset,
                "checkpoint_fingerprint": manifest.checkpoint_fingerprint,
                "files": manifest.files,
            },
            "wall_s": time.perf_counter() - started,
        },
        workers=run.workers,
        samples=run.samples,
        skipped=run.skipped,
    )
    print(report.markdown())
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        log(f"raw results: {json_out}")
