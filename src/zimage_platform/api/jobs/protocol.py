"""Wire schemas of the native jobs API (``/v1/jobs``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class HiresSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    from_size: str = Field(description="Bucket of the first pass, smaller than `size` (e.g. 512x512).")
    denoise: float = Field(0.5, gt=0, le=1, description="Strength of the refinement pass (0.4-0.6 works best).")


class JobRequest(BaseModel):
    """An asynchronous generation: text-to-image, edit (with an input image) or hires-fix."""

    model_config = ConfigDict(extra="forbid")
    variant: str = Field("turbo", description="turbo, base or edit (see GET /v1/models).")
    prompt: str = Field(description="What to draw or how to edit; any language.")
    negative_prompt: str | None = None
    size: str | None = Field(
        None,
        description="WIDTHxHEIGHT: one of the variant's buckets (fast path), or any size with sides multiples of "
        "16 within the variant's limits.",
    )
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="Images get seed, seed+1, ... (64-bit)")
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = Field(
        None, description="euler (default), res_multistep, dpmpp_2m, unipc or ddim (see GET /v1/models)."
    )
    scheduler: str | None = Field(
        None,
        description="Sigma schedule by ComfyUI name: simple (default), sgm_uniform, karras, exponential, "
        "ddim_uniform, beta, normal, linear_quadratic, kl_optimal.",
    )
    shift: float | None = None
    image_url: str | None = Field(
        None, description="Input image for edits: https://... or s3://<results bucket>/tenants/<you>/..."
    )
    strength: float | None = Field(None, description="How much of the input image is redrawn, (0, 1].")
    hires: HiresSpec | None = None
    webhook_url: str | None = Field(None, description="Receives job.* events, signed per Standard Webhooks.")


class JobImage(BaseModel):
    index: int
    seed: int
    status: Literal["pending", "done", "failed", "cancelled"]
    url: str | None = Field(None, description="Presigned GET URL (expires).")
    sha256: str | None = None
    size_bytes: int | None = None
    batch_size: int | None = None
    timings: list[dict[str, Any]] | None = None
    error_code: str | None = None


class JobError(BaseModel):
    code: str | None
    message: str | None


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    variant: str
    kind: Literal["text2img", "edit", "hires"]
    priority_class: str
    n: int
    params: dict[str, Any]
    images: list[JobImage]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    trace_id: str | None
    batch_id: str | None
    error: JobError | None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
