"""What goes into the pipeline and what comes out, independent of backend and transport."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from PIL import Image

from zimage_platform.pipeline.buckets import Resolution


class BatchKey(NamedTuple):
    """Requests with equal keys share one denoising loop, so they can be merged into a batch.

    Everything that changes the timestep schedule or the forward's shape is in the key; what
    only changes per-member arithmetic (prompt, negative prompt, seed, guidance scale) is not.
    """

    size: Resolution
    steps: int
    cfg: bool
    sampler: str
    shift: float
    #: ``None`` for text-to-image; the img2img strength otherwise (it cuts the schedule).
    strength: float | None
    #: The sigma schedule's ComfyUI name (``simple``: the model's own).
    scheduler: str = "simple"


@dataclass(frozen=True)
class HiresFix:
    """Two-stage generation: draw at ``base_size``, upscale, then img2img at the target size."""

    base_size: Resolution
    denoise: float = 0.5


@dataclass
class GenerationRequest:
    prompt: str
    size: Resolution
    seed: int
    steps: int
    guidance: float = 0.0
    negative_prompt: str = ""
    sampler: str = "euler"
    shift: float = 3.0
    scheduler: str = "simple"
    #: img2img / edit input, already decoded and checked; resized to ``size`` by the pipeline.
    init_image: Image.Image | None = None
    strength: float = 1.0
    hires: HiresFix | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: PNG text chunks to write into this image (a ComfyUI prompt's ``prompt`` and ``workflow``).
    png_text: dict[str, str] | None = None

    @property
    def cfg(self) -> bool:
        return self.guidance > 0

    def batch_key(self) -> BatchKey:
        return BatchKey(
            size=self.size,
            steps=self.steps,
            cfg=self.cfg,
            sampler=self.sampler,
            shift=self.shift,
            strength=self.strength if self.init_image is not None else None,
            scheduler=self.scheduler,
        )


@dataclass(frozen=True)
class StageMark:
    """A stage's wall-clock interval (ns since the epoch): what trace spans are made from."""

    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassTimings:
    """Seconds spent in each stage of one pass (hires-fix has two passes)."""

    name: str
    size: Resolution
    batch_size: int
    text_encode_s: float = 0.0
    image_encode_s: float = 0.0
    denoise_step_s: list[float] = field(default_factory=list)
    decode_s: float = 0.0
    png_encode_s: float = 0.0
    marks: list[StageMark] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str | None) -> Iterator[None]:
        """Time a stage into ``<name>_s`` and keep its wall-clock interval (``None``: not timed)."""
        wall, start = time.time_ns(), time.perf_counter()
        yield
        if name is not None:
            elapsed = time.perf_counter() - start
            setattr(self, f"{name}_s", elapsed)
            self.marks.append(StageMark(name, wall, wall + int(elapsed * 1e9)))

    def mark(self, name: str, start_ns: int, **attributes: Any) -> None:
        self.marks.append(StageMark(name, start_ns, time.time_ns(), attributes))

    @property
    def denoise_s(self) -> float:
        return sum(self.denoise_step_s)

    @property
    def total_s(self) -> float:
        return self.text_encode_s + self.image_encode_s + self.denoise_s + self.decode_s + self.png_encode_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "size": str(self.size),
            "batch_size": self.batch_size,
            "text_encode_s": round(self.text_encode_s, 6),
            "image_encode_s": round(self.image_encode_s, 6),
            "denoise_s": round(self.denoise_s, 6),
            "denoise_step_s": [round(s, 6) for s in self.denoise_step_s],
            "decode_s": round(self.decode_s, 6),
            "png_encode_s": round(self.png_encode_s, 6),
            "total_s": round(self.total_s, 6),
        }


@dataclass
class GenerationResult:
    request_id: str
    seed: int
    size: Resolution
    #: ``None`` when the request was cancelled before it finished.
    image: Image.Image | None
    png: bytes | None
    passes: list[PassTimings] = field(default_factory=list)
    cancelled: bool = False

    @property
    def total_s(self) -> float:
        return sum(p.total_s for p in self.passes)

    def timings(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.passes]


@dataclass(frozen=True)
class StepEvent:
    """One finished denoising step of a batch (fanned out to each member's job by the caller)."""

    request_ids: tuple[str, ...]
    step: int
    total: int
    pass_name: str


ProgressFn = Callable[[StepEvent], None]
#: Asked at every step boundary, per member: ``True`` stops that member there.
CancelFn = Callable[[str], bool]
