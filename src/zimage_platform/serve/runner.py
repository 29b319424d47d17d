"""What an engine replica does with a batch: generate, store each image in S3, report.

Ray-free on purpose: the Serve engine deployment wraps it, and tests and benchmarks run it in
this process. Generation runs in a worker thread so the replica's event loop stays free to
stream progress and to receive cancellations (broadcast by the scheduler).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context

from zimage_platform.engines.engine import Engine
from zimage_platform.errors import PlatformError
from zimage_platform.pipeline.buckets import BucketSet, Resolution
from zimage_platform.pipeline.images import ImageLimits, decode_image, encode_png
from zimage_platform.pipeline.types import GenerationRequest, GenerationResult, HiresFix, StepEvent
from zimage_platform.scheduling.work import (
    Batch,
    BatchOutcome,
    EngineReleased,
    ItemOutcome,
    Progress,
    WorkItem,
    follow,
)
from zimage_platform.storage.results import ResultStore
from zimage_platform.telemetry.metrics import metrics
from zimage_platform.telemetry.tracing import carrier, context_of, span, tracer

log = logging.getLogger(__name__)


def to_request(item: WorkItem, init_image=None) -> GenerationRequest:
    key = item.key
    return GenerationRequest(
        prompt=item.prompt,
        size=Resolution.parse(key.size),
        seed=item.seed,
        steps=key.steps,
        guidance=item.guidance,
        negative_prompt=item.negative_prompt,
        sampler=key.sampler,
        scheduler=key.scheduler,
        shift=key.shift,
        init_image=init_image,
        strength=key.strength if key.strength is not None else 1.0,
        hires=HiresFix(Resolution.parse(key.hires[0]), key.hires[1]) if key.hires else None,
        request_id=item.item_id,
        png_text=item.png_text,
    )


def report_stages(results: list[GenerationResult], variant: str, sizes: BucketSet) -> None:
    """The engine stages (text encode, denoise with its steps, decode, PNG) as spans and stage
    metrics, from the pipeline's own wall-clock marks (the pipeline stays free of telemetry code)."""
    passes = next((r.passes for r in results if r.passes), [])
    for timing in passes:
        for mark in timing.marks:
            seconds = (mark.end_ns - mark.start_ns) / 1e9
            metrics().stage_seconds.observe(seconds, stage=mark.name, variant=variant, bucket=sizes.label(timing.size))
            started = tracer().start_span(
                mark.name,
                start_time=mark.start_ns,
                attributes={
                    "zimage.pass": timing.name,
                    "zimage.bucket": str(timing.size),
                    "zimage.batch.size": timing.batch_size,
                    **{f"zimage.{k}": v for k, v in mark.attributes.items()},
                },
            )
            started.end(end_time=mark.end_ns)


class EngineRunner:
    """Runs batches on one engine: generation in a worker thread, then PNG encoding and the S3
    uploads in a small thread pool, *after* the engine has been released — the next batch can
    start denoising while this one's images are still being encoded and stored.
    """

    def __init__(
        self, engine: Engine, results: ResultStore, *, replica: str = "local", png_compress_level: int = 1
    ) -> None:
        self.engine = engine
        self.results = results
        self.replica = replica
        self.png_compress_level = png_compress_level
        self.cancelled: set[str] = set()
        self.busy = 0
        #: Encodes and uploads of finished batches (I/O bound: S3 round trips dominate).
        self._storers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="store")

    def cancel(self, item_ids: list[str]) -> None:
        """Stop these items at their next step boundary (called from the event loop)."""
        self.cancelled.update(item_ids)

    async def run(self, batch: Batch) -> AsyncIterator[Progress | EngineReleased | BatchOutcome]:
        """Yield progress while the batch runs, :class:`EngineReleased` when the engine is free
        again, then the batch's outcome (always, even on failure)."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Progress] = asyncio.Queue()

        def on_progress(event: StepEvent) -> None:
            progress = Progress(batch.id, event.request_ids, event.step, event.total, event.pass_name)
            loop.call_soon_threadsafe(updates.put_nowait, progress)

        generation = asyncio.ensure_future(asyncio.to_thread(self._generate, batch, on_progress))
        try:
            while not generation.done():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({generation, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not updates.empty():
                yield updates.get_nowait()
            try:
                generated = generation.result()
            except Exception as exc:
                yield EngineReleased(batch.id)
                yield self._crash(batch, exc)
                return
            yield EngineReleased(batch.id)
            yield await self._store_all(batch, generated)
        finally:
            self.cancelled.difference_update(i.item_id for i in batch.items)

    def _crash(self, batch: Batch, exc: BaseException) -> BatchOutcome:
        log.error("batch %s crashed: %r", batch.id, exc)
        code = exc.code if isinstance(exc, PlatformError) else "engine_failed"
        return BatchOutcome(
            batch.id,
            self.replica,
            0.0,
            [ItemOutcome(i.item_id, "failed", error_code=code, error_message=str(exc)) for i in batch.items],
        )

    def _generate(self, batch: Batch, on_progress) -> _Generated:
        """Adopt images an earlier attempt already stored, then generate the rest (engine held)."""
        self.busy += 1
        token = otel_context.attach(context_of(batch.trace_context))  # under the scheduler's batch span
        try:
            with span("engine", replica=self.replica, backend=self.engine.backend, batch_size=len(batch.items)):
                generated = _Generated()
                requests: list[GenerationRequest] = []
                for item in batch.items:
                    try:
                        adopted = self._adopt(item) if item.adopt else None
                        if adopted is not None:
                            generated.outcomes[item.item_id] = adopted
                            continue
                        image = self._input_image(item) if item.input_key else None
                        requests.append(to_request(item, image))
                    except PlatformError as exc:
                        generated.outcomes[item.item_id] = ItemOutcome(
                            item.item_id, "failed", error_code=exc.code, error_message=exc.message
                        )
                start = time.perf_counter()
                if requests:
                    generated.results = self.engine.run(
                        requests, on_progress, lambda rid: rid in self.cancelled, encode=False
                    )
                generated.engine_s = time.perf_counter() - start
                report_stages(generated.results, batch.variant, self.engine.sizes)
                generated.trace_context = carrier()
            return generated
        finally:
            otel_context.detach(token)
            self.busy -= 1

    def _adopt(self, item: WorkItem) -> ItemOutcome | None:
        """This job's image, stored by an attempt whose outcome was never recorded (the scheduler
        or the database failed after the upload): recorded as it is, not generated again."""
        stored = self.results.head(self._key(item))
        if stored is None:
            return None
        meta = stored.metadata
        if (meta.get("job-id"), meta.get("image-index"), meta.get("seed")) != (
            item.job_id,
            str(item.index),
            str(item.seed),
        ):
            return None  # not ours to adopt: the upload refuses to overwrite it and says why
        return ItemOutcome(
            item.item_id, "done", s3_key=stored.key, sha256=stored.sha256, size_bytes=stored.size, etag=stored.etag
        )

    async def _store_all(self, batch: Batch, generated: _Generated) -> BatchOutcome:
        items = {i.item_id: i for i in batch.items}
        loop = asyncio.get_running_loop()

        def store(result: GenerationResult) -> ItemOutcome:
            token = otel_context.attach(context_of(generated.trace_context))
            try:
                return self._store(items[result.request_id], result, batch)
            finally:
                otel_context.detach(token)

        stored = await asyncio.gather(*(loop.run_in_executor(self._storers, store, r) for r in generated.results))
        outcomes = {**generated.outcomes, **{o.item_id: o for o in stored}}
        return BatchOutcome(
            batch.id, self.replica, generated.engine_s, [outcomes[i.item_id] for i in batch.items], self.engine.backend
        )

    def _input_image(self, item: WorkItem):
        assert item.input_key is not None
        return decode_image(self.results.get_bytes(item.input_key), ImageLimits(max_pixels=64 * 1024 * 1024))

    def _key(self, item: WorkItem) -> str:
        return self.results.image_key(item.tenant_id, item.job_id, item.index, item.created_at)

    def _store(self, item: WorkItem, result: GenerationResult, batch: Batch) -> ItemOutcome:
        if result.cancelled or result.image is None:
            return ItemOutcome(item.item_id, "cancelled", error_code="cancelled_by_client")
        timings = result.timings()
        png = result.png
        if png is None:  # encoded here, after the engine was released
            label = self.engine.sizes.label(result.size)
            with span("png_encode", bucket=label):
                started = time.perf_counter()
                png = encode_png(result.image, self.png_compress_level, text=item.png_text)
                seconds = time.perf_counter() - started
            metrics().stage_seconds.observe(seconds, stage="png_encode", variant=batch.variant, bucket=label)
            if timings:
                timings[-1]["png_encode_s"] = round(seconds, 6)
                timings[-1]["total_s"] = round(timings[-1]["total_s"] + seconds, 6)
        metadata: dict[str, Any] = {
            "job-id": item.job_id,
            "image-index": str(item.index),
            "seed": str(item.seed),
            "variant": item.key.variant,
            "bucket": item.key.size,
            "batch-id": batch.id,
        }
        if item.trace_id:
            metadata["trace-id"] = item.trace_id
        try:
            stored = self.results.put_image(self._key(item), png, metadata)
        except PlatformError as exc:
            return ItemOutcome(item.item_id, "failed", error_code=exc.code, error_message=exc.message)
        return ItemOutcome(
            item.item_id,
            "done",
            s3_key=stored.key,
            sha256=stored.sha256,
            size_bytes=stored.size,
            etag=stored.etag,
            timings=timings,
            png=png if item.inline else None,
        )


@dataclass
class _Generated:
    """A batch after the engine: images to store, items settled without it, the engine's time."""

    results: list[GenerationResult] = field(default_factory=list)
    outcomes: dict[str, ItemOutcome] = field(default_factory=dict)
    engine_s: float = 0.0
    trace_context: dict[str, str] = field(default_factory=dict)


class LocalEngineClient:
    """The scheduler's :class:`EngineClient` over runners in this process (tests, benchmarks).

    ``slots`` stands in for replicas × concurrent batches: a runner is used by one batch at a
    time per slot, as on a real replica.
    """

    def __init__(self, runners: dict[tuple[str, str], EngineRunner]) -> None:
        self.runners = runners

    async def run(self, batch: Batch, on_progress, on_released=None) -> BatchOutcome:
        return await follow(self.runners[(batch.pool, batch.variant)].run(batch), on_progress, on_released)

    async def wake(self, pool: str, variant: str) -> None:
        """In-process runners are always there."""

    async def cancel(self, pool: str, variant: str, item_ids: list[str]) -> None:
        self.runners[(pool, variant)].cancel(item_ids)
