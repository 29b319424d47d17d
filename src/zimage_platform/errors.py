"""Errors with a machine-readable reason.

Every error the platform raises on purpose carries a stable ``code`` (what went wrong, for
programs), a human message, the offending ``param`` where there is one, and the valid
``choices`` where the caller picked from a set. The HTTP layer and the CLI render these the
same way, so a caller never has to parse prose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PlatformError(Exception):
    """Base class: an expected failure with a reason code."""

    code: str = "platform_error"
    #: HTTP status the API layer maps this error to.
    status: int = 500

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        choices: Sequence[Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.choices = list(choices) if choices is not None else None

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle whole: class, message and every attribute, whatever the subclass's ``__init__``
        takes. Errors cross Ray handle calls (scheduler → ingress) by pickle; the default
        (``cls(*args)``) fails for keyword-only arguments, and flattening to a dict lost the class."""
        return _restore, (type(self), self.message), dict(self.__dict__)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": type(self).__name__, "code": self.code, "message": self.message}
        if self.param is not None:
            body["param"] = self.param
        if self.choices is not None:
            body["choices"] = self.choices
        return body


def _restore(cls: type[PlatformError], message: str) -> PlatformError:
    """An unpickled error, before its attributes are set back (``__setstate__``)."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


class InvalidRequest(PlatformError):
    """The caller asked for something we do not offer (bad size, sampler, steps...)."""

    code = "invalid_request"
    status = 422


class CheckpointError(PlatformError):
    """A checkpoint is missing, unsafe (pickle), truncated or corrupted."""

    code = "checkpoint_invalid"
    status = 500


class EngineError(PlatformError):
    """An engine could not be built, loaded, verified or run."""

    code = "engine_error"
    status = 500


class BackendUnavailable(EngineError):
    """The backend's runtime is not installed on this machine (e.g. TensorRT on a CPU box)."""

    code = "backend_unavailable"


class Cancelled(PlatformError):
    """Work stopped at a step boundary because its caller cancelled it."""

    code = "cancelled"
    status = 409
