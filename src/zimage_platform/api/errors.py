"""One error shape everywhere: ``{"error": {"type", "code", "message", "param"}}``.

4xx for the caller's mistakes (with the valid choices when there is a set), 5xx only for ours.
The shape is OpenAI's, so the ``openai`` client raises its usual typed errors on our responses.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from zimage_platform.errors import PlatformError
from zimage_platform.telemetry.metrics import metrics

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(status: int, code: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "code": code,
        "message": message,
        "param": param,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return {"error": body}


def error_response(status: int, code: str, message: str, param: str | None = None, *, headers=None, **extra):
    return JSONResponse(error_body(status, code, message, param, **extra), status_code=status, headers=headers)


def platform_error_response(exc: PlatformError) -> JSONResponse:
    status = exc.status if exc.status >= 400 else 500
    metrics().rejections.inc(reason=exc.code, status=status)
    headers = dict(getattr(exc, "headers", None) or {})
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return error_response(
        status,
        exc.code,
        exc.message,
        exc.param,
        headers=headers,
        choices=exc.choices,
        reason=getattr(exc, "reason", None),
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PlatformError)
    async def _platform(_: Request, exc: PlatformError) -> JSONResponse:
        if exc.status >= 500:
            log.error("platform error %s: %s", exc.code, exc.message)
        return platform_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header", "form")]
        message = first.get("msg", "invalid request")
        choices = (first.get("ctx") or {}).get("expected")
        metrics().rejections.inc(reason="invalid_parameter", status=422)
        return error_response(
            422, "invalid_parameter", f"{'.'.join(loc) or 'request'}: {message}", ".".join(loc) or None, choices=choices
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        """The job table is down: nothing was accepted, so the caller can safely retry."""
        log.error("database error: %s", exc)
        metrics().rejections.inc(reason="database_unavailable", status=503)
        return error_response(
            503,
            "database_unavailable",
            "the job database cannot be reached; nothing was accepted, retry later",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        metrics().rejections.inc(reason="internal_error", status=500)
        return error_response(500, "internal_error", "an internal error occurred; it has been logged")
