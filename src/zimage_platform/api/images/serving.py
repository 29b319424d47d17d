"""Serving logic of the OpenAI-compatible images endpoints: a job, waited for."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from zimage_platform.api.generation import (
    params_from,
    prepare_job,
    raise_for_failed,
    request_hash,
    store_input_image,
    submit_and_wait,
)
from zimage_platform.api.images.protocol import ImageGenerationRequest
from zimage_platform.api.services import PlatformServices
from zimage_platform.errors import InvalidRequest, PlatformError
from zimage_platform.telemetry.context import RequestTrace
from zimage_platform.tenancy import TenantSpec

#: OpenAI-style model names for the variants (the bare variant names work too).
MODEL_ALIASES = {"z-image-turbo": "turbo", "z-image-base": "base", "z-image-edit": "edit"}


class ModelNotFound(PlatformError):
    code = "model_not_found"
    status = 404


class GenerationTimeout(PlatformError):
    code = "generation_timeout"
    status = 504


def variant_for(services: PlatformServices, model: str | None, variant: str | None) -> str:
    name = variant or MODEL_ALIASES.get(model or "z-image-turbo", model or "turbo")
    if name not in services.config.variants:
        models = sorted(
            [*(a for a, v in MODEL_ALIASES.items() if v in services.config.variants), *services.config.variants]
        )
        raise ModelNotFound(f"the model {model or name!r} does not exist", param="model", choices=models)
    return name


async def generate(
    services: PlatformServices,
    tenant: TenantSpec,
    request: ImageGenerationRequest,
    trace: RequestTrace,
    *,
    image: bytes | None = None,
    strength: float | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    variant = variant_for(services, request.model, request.variant)
    input_image, input_key = (
        await asyncio.to_thread(store_input_image, services, tenant, image) if image is not None else (None, None)
    )
    params = params_from(
        request,
        size=None if request.size in (None, "auto") else request.size,
        image=input_image,
        strength=strength,
    )
    source = "openai"
    job = await asyncio.to_thread(  # the content policy may write an audit row
        prepare_job,
        services,
        tenant,
        variant,
        params,
        source=source,
        trace=trace,
        input_key=input_key,
        idempotency_key=idempotency_key,
        body_hash=request_hash({**request.model_dump(mode="json"), "strength": strength}, image),
    )
    inline = request.response_format != "url"
    submitted = await submit_and_wait(services, tenant, job, inline=inline)
    row = submitted.row
    if submitted.timed_out:
        raise GenerationTimeout(
            f"the images were not ready within {services.config.limits.sync_timeout_s:.0f}s; "
            f"job {row.id} goes on: GET /v1/jobs/{row.id}",
            param=row.id,
        )
    raise_for_failed(row)
    data = []
    for image in row.images:
        item: dict[str, Any] = {"seed": image.seed}
        if not inline:
            item["url"] = services.results.presign_get(image.s3_key)
        else:
            png = submitted.pngs.get(image.index)
            if png is None:  # not handed over (an idempotent replay, an adopted image): from S3
                png = await asyncio.to_thread(services.results.get_bytes, image.s3_key)
            item["b64_json"] = base64.b64encode(png).decode()
        data.append(item)
    return {"created": int(row.created_at.timestamp()), "data": data, "job_id": row.id}


def edit_strength(value: str | None) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        raise InvalidRequest("strength must be a number", code="invalid_parameter", param="strength") from None
