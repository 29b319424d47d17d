"""HTTP routes of the OpenAI-compatible Images API (``openai`` clients work unchanged)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Header, UploadFile

from zimage_platform.api.body import StrictJSONRoute, parse_model
from zimage_platform.api.deps import Generating, Services, Trace
from zimage_platform.api.images import serving
from zimage_platform.api.images.protocol import ImageGenerationRequest, ImagesResponse
from zimage_platform.errors import InvalidRequest

router = APIRouter(prefix="/v1/images", tags=["images (OpenAI-compatible)"], route_class=StrictJSONRoute)


#: Same key + same body → the same images (the earlier job's, not generated again); another body → 409.
IdempotencyKey = Annotated[str | None, Header(max_length=255)]


@router.post("/generations", response_model=ImagesResponse, response_model_exclude_none=True)
async def create_images(
    body: ImageGenerationRequest,
    services: Services,
    tenant: Generating,
    trace: Trace,
    idempotency_key: IdempotencyKey = None,
) -> dict:
    """Synchronous text-to-image, wire-compatible with OpenAI's ``POST /v1/images/generations``."""
    return await serving.generate(services, tenant, body, trace, idempotency_key=idempotency_key)


@router.post("/edits", response_model=ImagesResponse, response_model_exclude_none=True)
async def edit_images(
    services: Services,
    tenant: Generating,
    trace: Trace,
    image: Annotated[UploadFile, File(description="The image to edit (PNG, JPEG, WebP).")],
    prompt: Annotated[str, Form()],
    model: Annotated[str | None, Form()] = "z-image-edit",
    n: Annotated[int, Form()] = 1,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[str, Form()] = "url",
    user: Annotated[str | None, Form()] = None,
    seed: Annotated[int | None, Form()] = None,
    steps: Annotated[int | None, Form()] = None,
    guidance: Annotated[float | None, Form()] = None,
    strength: Annotated[str | None, Form()] = None,
    idempotency_key: IdempotencyKey = None,
) -> dict:
    """OpenAI's ``images.edit``: the Edit variant (img2img with ``strength`` on this checkpoint)."""
    limit = services.config.limits.max_input_image_bytes
    data = await image.read(limit + 1)
    if len(data) > limit:
        raise InvalidRequest(f"image is larger than {limit} bytes", code="image_too_large", param="image")
    request = parse_model(
        ImageGenerationRequest,
        {
            "prompt": prompt,
            "model": model,
            "n": n,
            "size": size,
            "response_format": response_format,
            "user": user,
            "seed": seed,
            "steps": steps,
            "guidance": guidance,
        },
    )
    return await serving.generate(
        services,
        tenant,
        request,
        trace,
        image=data,
        strength=serving.edit_strength(strength),
        idempotency_key=idempotency_key,
    )
