"""Wire schema of ``GET /v1/usage``."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel


class UsageRow(BaseModel):
    day: str | None = None
    variant: str | None = None
    images: int
    gpu_seconds: float
    amount: str
    currency: str


class Usage(BaseModel):
    object: Literal["usage"] = "usage"
    tenant: str
    start: date
    end: date
    group_by: Literal["day", "variant"]
    data: list[UsageRow]
    total: UsageRow
