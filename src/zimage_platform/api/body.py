"""Request bodies: strict JSON (no NaN/Infinity), and JSON or multipart (JSON + an uploaded image)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from zimage_platform.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


class NonFiniteNumber(InvalidRequest):
    """``NaN``, ``Infinity`` or a number too large for a float: Python's ``json`` reads them,
    but they are not JSON, and nothing stored with one could be sent back as JSON."""

    code = "non_finite_number"


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise NonFiniteNumber(f"the number {text[:40]} is too large", param="body")
    return value


def _constant(name: str) -> float:
    raise NonFiniteNumber(f"{name} is not a JSON number (finite numbers only)", param="body")


def loads(raw: str | bytes) -> Any:
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and numbers that overflow a float
    (:class:`NonFiniteNumber`); malformed JSON raises ``ValueError`` as usual."""
    return json.loads(raw, parse_constant=_constant, parse_float=_finite)  # NonFiniteNumber is no ValueError


def _is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            self._strict_json = loads(await self.body())
        return self._strict_json


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies (parsed by FastAPI into models) refuse non-finite numbers with
    the platform's error (422 ``non_finite_number``) before the model sees them."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            request = _StrictJSONRequest(request.scope, request.receive)
            if _is_json(request) and await request.body():
                with contextlib.suppress(ValueError):  # malformed: FastAPI reports it as it always does
                    await request.json()
            return await handler(request)

        return strict


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
                fields = loads(raw)
            except ValueError:
                raise InvalidRequest(
                    "the `request` form field is not valid JSON", code="invalid_json", param="request"
                ) from None
        else:
            fields = {k: v for k, v in form.items() if k != file_field}
        return parse_model(model, fields), data
    try:
        payload = loads(await request.body())
    except ValueError:
        raise InvalidRequest("the body is not valid JSON", code="invalid_json") from None
    return parse_model(model, payload), None
