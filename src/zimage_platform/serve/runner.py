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
from typing import Any

from opentelemetry import context as otel_context

from zimage_platform.engines.engine import PipelineEngine
from zimage_platform.errors import PlatformError
from zimage_platform.pipeline.buckets import BucketSet, Resolution
from zimage_platform.pipeline.images import ImageLimits, decode_image
from zimage_platform.pipeline.types import GenerationRequest, GenerationResult, HiresFix, StepEvent
from zimage_platform.scheduling.work import Batch, BatchOutcome, ItemOutcome, Progress, WorkItem
from zimage_platform.storage.results import ResultStore
from zimage_platform.telemetry.metrics import metrics
from zimage_platform.telemetry.tracing import context_of, span, tracer

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
    def __init__(self, engine: PipelineEngine, results: ResultStore, *, replica: str = "local") -> None:
        self.engine = engine
        self.results = results
        self.replica = replica
        self.cancelled: set[str] = set()
        self.busy = 0

    def cancel(self, item_ids: list[str]) -> None:
        """Stop these items at their next step boundary (called from the event loop)."""
        self.cancelled.update(item_ids)

    async def run(self, batch: Batch) -> AsyncIterator[Progress | BatchOutcome]:
        """Yield progress while the batch runs, then its outcome (always, even on failure)."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Progress | BatchOutcome] = asyncio.Queue()

        def on_progress(event: StepEvent) -> None:
            progress = Progress(batch.id, event.request_ids, event.step, event.total, event.pass_name)
            loop.call_soon_threadsafe(updates.put_nowait, progress)

        task = asyncio.create_task(asyncio.to_thread(self._run_sync, batch, on_progress))
        task.add_done_callback(lambda t: updates.put_nowait(t.result() if not t.exception() else self._crash(batch, t)))
        while True:
            message = await updates.get()
            yield message
            if isinstance(message, BatchOutcome):
                self.cancelled.difference_update(i.item_id for i in batch.items)
                return

    def _crash(self, batch: Batch, task: asyncio.Task) -> BatchOutcome:
        exc = task.exception()
        log.error("batch %s crashed: %r", batch.id, exc)
        code = exc.code if isinstance(exc, PlatformError) else "engine_failed"
        return BatchOutcome(
            batch.id,
            self.replica,
            0.0,
            [ItemOutcome(i.item_id, "failed", error_code=code, error_message=str(exc)) for i in batch.items],
        )

    def _run_sync(self, batch: Batch, on_progress) -> BatchOutcome:
        self.busy += 1
        token = otel_context.attach(context_of(batch.trace_context))  # under the scheduler's batch span
        try:
            with span("engine", replica=self.replica, backend=self.engine.backend, batch_size=len(batch.items)):
                requests: list[GenerationRequest] = []
                outcomes: dict[str, ItemOutcome] = {}
                for item in batch.items:
                    try:
                        image = self._input_image(item) if item.input_key else None
                        requests.append(to_request(item, image))
                    except PlatformError as exc:
                        outcomes[item.item_id] = ItemOutcome(
                            item.item_id, "failed", error_code=exc.code, error_message=exc.message
                        )
                start = time.perf_counter()
                results = self.engine.run(requests, on_progress, lambda rid: rid in self.cancelled) if requests else []
                engine_s = time.perf_counter() - start
                report_stages(results, batch.variant, self.engine.sizes)
                items = {i.item_id: i for i in batch.items}
                for result in results:
                    outcomes[result.request_id] = self._store(items[result.request_id], result, batch)
            return BatchOutcome(
                batch.id, self.replica, engine_s, [outcomes[i.item_id] for i in batch.items], self.engine.backend
            )
        finally:
            otel_context.detach(token)
            self.busy -= 1

    def _input_image(self, item: WorkItem):
        assert item.input_key is not None
        return decode_image(self.results.get_bytes(item.input_key), ImageLimits(max_pixels=64 * 1024 * 1024))

    def _store(self, item: WorkItem, result: GenerationResult, batch: Batch) -> ItemOutcome:
        if result.cancelled or result.png is None:
            return ItemOutcome(item.item_id, "cancelled", error_code="cancelled_by_client")
        key = self.results.image_key(item.tenant_id, item.job_id, item.index, item.created_at)
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
            stored = self.results.put_image(key, result.png, metadata)
        except PlatformError as exc:
            return ItemOutcome(item.item_id, "failed", error_code=exc.code, error_message=exc.message)
        return ItemOutcome(
            item.item_id,
            "done",
            s3_key=stored.key,
            sha256=stored.sha256,
            size_bytes=stored.size,
            etag=stored.etag,
            timings=result.timings(),
        )


class LocalEngineClient:
    """The scheduler's :class:`EngineClient` over runners in this process (tests, benchmarks).

    ``slots`` stands in for replicas × concurrent batches: a runner is used by one batch at a
    time per slot, as on a real replica.
    """

    def __init__(self, runners: dict[tuple[str, str], EngineRunner]) -> None:
        self.runners = runners

    async def run(self, batch: Batch, on_progress) -> BatchOutcome:
        runner = self.runners[(batch.pool, batch.variant)]
        outcome: BatchOutcome | None = None
        async for message in runner.run(batch):
            if isinstance(message, BatchOutcome):
                outcome = message
            else:
                on_progress(message)
        assert outcome is not None
        return outcome

    async def cancel(self, pool: str, variant: str, item_ids: list[str]) -> None:
        self.runners[(pool, variant)].cancel(item_ids)
