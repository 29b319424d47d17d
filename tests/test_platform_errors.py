"""Platform errors keep their class, reason code and attributes across pickling (Ray handle calls)."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest

import zimage_platform
from zimage_platform.errors import PlatformError


def _all_subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _all_subclasses(sub)
    return found


def platform_errors() -> list[type[PlatformError]]:
    """Every PlatformError subclass in the package (each module imported to find them)."""
    for module in pkgutil.walk_packages(zimage_platform.__path__, "zimage_platform."):
        if ".migrations." in module.name:  # Alembic scripts, not importable on their own
            continue
        importlib.import_module(module.name)
    found = {c for c in _all_subclasses(PlatformError) if c.__module__.startswith("zimage_platform.")}
    return sorted(found | {PlatformError}, key=lambda c: f"{c.__module__}.{c.__qualname__}")


ERRORS = platform_errors()


def test_the_package_has_many_typed_errors():
    names = {c.__name__ for c in ERRORS}
    assert {"JobNotFound", "RateLimited", "QueueFull", "InvalidRequest", "AuthError"} <= names


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_platform_error_pickles_whole(cls):
    """Built without its own __init__ (whose arguments differ per class), with an instance code,
    param, choices and extra attributes, as subclasses set them."""
    exc = cls.__new__(cls)
    PlatformError.__init__(exc, "something went wrong", code=f"{cls.code}_x", param="p", choices=["a", "b"])
    exc.retry_after_s = 7
    exc.headers = {"X-RateLimit-Kind": "images"}
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert (back.message, str(back), back.code, back.status) == ("something went wrong",) * 2 + (exc.code, cls.status)
    assert (back.param, back.choices, back.retry_after_s, back.headers) == ("p", ["a", "b"], 7, exc.headers)
    assert back.to_dict() == exc.to_dict()


def test_errors_built_the_usual_way_round_trip():
    from zimage_platform.scheduling.admission import QueueFull
    from zimage_platform.scheduling.store import JobNotFound
    from zimage_platform.tenancy.ratelimit import RateDecision, RateLimited

    decision = RateDecision(False, "images", 10, 0, 2_000_000_000.0)
    for exc in (
        JobNotFound("no job j1", param="job_id"),
        QueueFull("the bulk queue is full", retry_after_s=12),
        RateLimited("too many", decision=decision),
    ):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and back.__dict__ == exc.__dict__


def test_scheduler_results_over_ray_keep_the_error_class():
    """The Serve deployments return expected errors as values; the ingress raises them again as
    themselves (JobNotFound → 404 job_not_found), not as a bare PlatformError."""
    from zimage_platform.api.errors import platform_error_response
    from zimage_platform.scheduling.admission import QueueFull
    from zimage_platform.scheduling.store import JobNotFound
    from zimage_platform.serve.deployments import _err, _unwrap

    for exc, status in ((JobNotFound("no job j1", param="job_id"), 404), (QueueFull("full", retry_after_s=9), 429)):
        over_ray = pickle.loads(pickle.dumps(_err(exc)))
        with pytest.raises(type(exc)) as raised:
            _unwrap(over_ray)
        response = platform_error_response(raised.value)
        assert response.status_code == status and raised.value.code == exc.code
        if status == 429:
            assert response.headers["retry-after"] == "9"
