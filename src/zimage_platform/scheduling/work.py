"""Work items (one image of one job) and the key that says which of them may share a batch."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from zimage_platform.errors import PlatformError

#: Priority classes, highest first.
PRIORITY_CLASSES: tuple[str, ...] = ("realtime", "standard", "bulk")


class WorkKey(NamedTuple):
    """Items with equal keys can be denoised in one batch on one engine.

    The pipeline's own batch key (size, steps, CFG on/off, sampler, shift, img2img strength,
    sigma schedule) plus what selects the engine (variant) and the two-pass hires-fix shape.
    A size outside the buckets is a key of its own: it batches only with that size.
    """

    variant: str
    size: str
    steps: int
    cfg: bool
    sampler: str
    shift: float
    strength: float | None
    hires: tuple[str, float] | None
    scheduler: str = "simple"


@dataclass
class WorkItem:
    """One image to generate. Everything the engine replica needs travels with it."""

    job_id: str
    index: int
    tenant_id: str
    priority: str
    key: WorkKey
    seed: int
    prompt: str
    negative_prompt: str
    guidance: float
    #: S3 key of the img2img / edit input image, if any.
    input_key: str | None
    created_at: datetime
    trace_id: str | None = None
    #: W3C trace context of the request that created the job (carried, never global).
    trace_context: dict[str, str] = field(default_factory=dict)
    #: PNG text chunks for the image (a ComfyUI prompt's ``prompt`` and ``workflow``).
    png_text: dict[str, str] | None = None
    #: Scheduler clock (seconds) when it entered the queue, and its queue deadline.
    enqueued_at: float = 0.0
    #: Wall clock (ns) when it entered the queue: the start of its "queue wait" span.
    enqueued_wall_ns: int = 0
    deadline: float | None = None
    #: An earlier attempt may have stored this image already (recovery, or a retry after a failed
    #: upload): the engine replica reuses a stored object of this job, index and seed instead of
    #: generating (and billing) it again.
    adopt: bool = False
    #: A synchronous caller waits for the bytes: the replica hands the PNG back with the outcome.
    inline: bool = False
    #: Set while the item sits in a queue (lets expired-deadline heap entries be skipped lazily).
    queued: bool = field(default=False, compare=False)
    #: Which queue entry is the live one: removals are lazy, so a stale entry of a re-queued item
    #: must not count (set by :class:`~zimage_platform.scheduling.queue.PoolQueue`).
    queue_token: int = field(default=-1, compare=False, repr=False)

    @property
    def item_id(self) -> str:
        return f"{self.job_id}:{self.index}"


@dataclass
class Batch:
    """Compatible items dispatched together to one engine call."""

    id: str
    pool: str
    key: WorkKey
    items: list[WorkItem]
    #: The pool whose queue the work came from (differs from ``pool`` when capacity was borrowed).
    source_pool: str | None = None
    #: W3C context of the batch's span: engine spans hang under it in another process.
    trace_context: dict[str, str] = field(default_factory=dict)
    #: The engine replica the dispatcher placed it on (one with a free engine slot); ``None``
    #: when replicas are not known one by one (in-process engines, the capacity simulator).
    replica: str | None = None

    @property
    def variant(self) -> str:
        return self.key.variant

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class ItemOutcome:
    """What the engine replica reports for one item."""

    item_id: str
    status: str  # done | cancelled | failed
    s3_key: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    etag: str | None = None
    timings: list[dict[str, Any]] = field(default_factory=list)
    error_code: str | None = None
    error_message: str | None = None
    #: The PNG itself, for items a synchronous caller waits for inline (else ``None``).
    png: bytes | None = None


@dataclass
class BatchOutcome:
    batch_id: str
    replica: str
    #: Wall seconds the engine spent on the whole batch (for GPU-second attribution).
    engine_s: float
    items: list[ItemOutcome]
    backend: str = "unknown"


@dataclass
class EngineReleased:
    """The engine finished the batch's denoising and decoding: its slot may take the next batch
    while this one's images are encoded and stored."""

    batch_id: str


@dataclass
class Progress:
    batch_id: str
    item_ids: tuple[str, ...]
    step: int
    total: int
    pass_name: str


async def follow(
    messages: AsyncIterator[Any],
    on_progress: Callable[[Progress], None],
    on_released: Callable[[], None] | None,
) -> BatchOutcome:
    """Consume an engine's stream for the scheduler: progress and release go to their callbacks,
    the outcome is returned (an engine that ends without one lost the batch)."""
    outcome: BatchOutcome | None = None
    async for message in messages:
        if isinstance(message, BatchOutcome):
            outcome = message
        elif isinstance(message, EngineReleased):
            if on_released is not None:
                on_released()
        else:
            on_progress(message)
    if outcome is None:
        raise PlatformError("the engine replica ended the batch without an outcome", code="engine_lost_batch")
    return outcome
