"""Wire schemas of bulk batches (``/v1/batches``): a CSV or JSONL file and a prompt template."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class BatchDefaults(BaseModel):
    """Applied to every row; a row's own columns (size, seed, variant, ...) win."""

    model_config = ConfigDict(extra="forbid")
    variant: str = "turbo"
    size: str | None = None
    n: int = Field(1, ge=1, le=16)
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    sampler: str | None = None
    scheduler: str | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    template: str | None = Field(
        None,
        description="Prompt with {column} placeholders, e.g. 'studio photo of {product}, {color}'. "
        "Without it, each row needs a 'prompt' column.",
    )
    defaults: BatchDefaults = BatchDefaults()
    webhook_url: str | None = None


class RejectedRow(BaseModel):
    line: int
    code: str
    message: str
    param: str | None = None


class BatchRowStatus(BaseModel):
    line: int
    job_id: str
    status: str
    error_code: str | None = None


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    status: Literal["running", "completed"]
    total_rows: int
    counts: dict[str, int]
    rejected: list[RejectedRow]
    rows: list[BatchRowStatus]
    manifest_url: str | None
    created_at: datetime
    finished_at: datetime | None
