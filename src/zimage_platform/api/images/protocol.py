"""Wire schemas of the OpenAI-compatible Images API, plus the platform's extension fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageGenerationRequest(BaseModel):
    """OpenAI's ``images.generate`` body. Unknown fields are refused (422 with the field name)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = Field(None, description="z-image-turbo (default), z-image-base, or a variant name.")
    n: int = Field(1, ge=1, le=16)
    size: str | None = Field(
        None,
        description="WIDTHxHEIGHT or 'auto' (the variant's default): a bucket (fast path) or any size with "
        "sides multiples of 16 within the variant's limits (GET /v1/models).",
    )
    response_format: Literal["url", "b64_json"] = "url"
    user: str | None = Field(None, max_length=256, description="Your end user's id (recorded, not used).")
    output_format: Literal["png"] = "png"
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(
        None, description="Accepted for compatibility; steps control quality here."
    )
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted for compatibility; no effect.")
    stream: Literal[False] = False
    # -- platform extensions (send with the openai client's extra_body) --
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    scheduler: str | None = Field(None, description="Sigma schedule by ComfyUI name (default simple).")
    shift: float | None = None
    variant: str | None = None


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    seed: int | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    #: Extension: the job that produced these images (GET /v1/jobs/{id} for timings).
    job_id: str | None = None
