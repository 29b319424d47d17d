"""Request bodies that may come as JSON or as multipart (JSON + an uploaded image)."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from zimage_platform.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


def validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return InvalidRequest(f"{param or 'request'}: {first.get('msg')}", code="invalid_parameter", param=param)


def parse_model(model: type[M], data: object) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def json_or_multipart(
    request: Request, model: type[M], *, file_field: str, max_file_bytes: int
) -> tuple[M, bytes | None]:
    """``application/json`` → the model; ``multipart/form-data`` → ``request`` (JSON) + a file."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=64, max_part_size=max_file_bytes + 1024)
        upload = form.get(file_field)
        data: bytes | None = None
        if isinstance(upload, UploadFile):
            data = await upload.read(max_file_bytes + 1)
            if len(data) > max_file_bytes:
                raise InvalidRequest(
                    f"{file_field} is larger than {max_file_bytes} bytes", code="image_too_large", param=file_field
                )
        raw = form.get("request")
        if isinstance(raw, str):
            try:
                fields = json.loads(raw)
            except ValueError:
                raise InvalidRequest(
                    "the `request` form field is not valid JSON", code="invalid_json", param="request"
                ) from None
        else:
            fields = {k: v for k, v in form.items() if k != file_field}
        return parse_model(model, fields), data
    try:
        payload = await request.json()
    except ValueError:
        raise InvalidRequest("the body is not valid JSON", code="invalid_json") from None
    return parse_model(model, payload), None
