"""Every operation of the OpenAPI document gets a few schemathesis cases, with the tenant's key
and without one: none may answer 5xx. The full run is ``python -m bench fuzz`` (10,000 cases);
this one catches regressions in CI in well under a minute.

The platform is the in-process one (API, scheduler, runners, SeaweedFS S3, SQLite) on a loopback
port in this process (``comfy_server.ServerThread``): schemathesis is synchronous, the
scheduler's event loop must keep running beside it. The engines are the simulated ones (GPU-timed
sleeps, no CPU), and the tenant may ask for at most 128² images, so generations stay short.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from schemathesis import GenerationMode

from comfy_server import ServerThread
from isolated import isolated_config
from tenants import add_tenant
from zimage_platform.config import PlatformConfig
from zimage_platform.engines import create_engine

REPO = Path(__file__).resolve().parents[2]
SIMULATED = {
    "acknowledge_not_real": True,
    "latency": str(REPO / "ops" / "latency" / "h800-mig.yaml"),
    "slice": "3g.40gb",
    "precision": "bf16",
}
LIMITS = {"requests_per_minute": 100_000, "images_per_minute": 60, "concurrent_jobs": 4, "max_pixels": 128 * 128}
#: Cases per operation and generation mode (a few: the point is that every handler runs).
CASES = 2


@pytest.fixture(scope="module")
def server(config: PlatformConfig, s3, tmp_path_factory):
    data = config.model_dump(mode="json")
    data["engine"] |= {"backend": "simulated", "simulated": SIMULATED}
    simulated = PlatformConfig.model_validate(data)
    api_config = isolated_config(simulated, s3, tmp_path_factory.mktemp("fuzz"), limits={"sync_timeout_s": 60})
    key = add_tenant(api_config, "fuzz", limits=LIMITS)
    pool = next(iter(api_config.pools))
    engines = {}
    for variant in api_config.variants:
        engines[variant] = engine = create_engine(api_config, variant, pool)
        engine.load()
    thread = ServerThread(api_config, engines).start()
    yield thread, key
    thread.stop()


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=schemathesis.Config())
    return [result.ok() for result in schema.get_all_operations()]


def fuzz_part(
    operation, mode: GenerationMode, cases: int, seed: int, url: str, key: str | None
) -> list[tuple[int, str]]:
    """``cases`` cases of one operation (with the tenant's key unless ``key`` is None); their
    (status, curl) pairs."""
    answers: list[tuple[int, str]] = []

    @settings(
        max_examples=cases,
        phases=[Phase.generate],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @hypothesis_seed(seed)
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        if key is not None:
            kept = {k: v for k, v in (case.headers or {}).items() if k.lower() not in ("authorization", "x-api-key")}
            case.headers = {**kept, "Authorization": f"Bearer {key}"}
        response = case.call(base_url=url, timeout=90)
        curl = case.as_curl_command(base_url=url)
        answers.append(
            (response.status_code, f"{curl.replace(key, '$KEY') if key else curl}\n    {response.text[:300]}")
        )

    try:
        check()
    except Exception as exc:  # only "this operation has no negative cases" is acceptable
        assert re.search(r"Unable to satisfy assumptions|Unsatisfiable", str(exc)), exc
    return answers


def test_no_operation_answers_5xx(server) -> None:
    thread, key = server
    ops = operations(thread.url)
    assert len(ops) > 40  # the native API, the ComfyUI routes and the frontend's API are all there
    errors: list[str] = []
    untested: list[str] = []
    for index, operation in enumerate(ops):
        parts = [(GenerationMode.POSITIVE, key, CASES), (GenerationMode.POSITIVE, None, 1)]
        if operation.query.items or operation.body.items:  # (any string is a valid path parameter)
            parts.append((GenerationMode.NEGATIVE, key, CASES))
        answers = []
        for part, (mode, with_key, cases) in enumerate(parts):
            answers += fuzz_part(operation, mode, cases, index * 10 + part, thread.url, with_key)
        untested += [] if answers else [operation.label]
        errors += [f"{status} {operation.label}: {request}" for status, request in answers if status >= 500]
    assert not errors, "server errors:\n" + "\n".join(errors)
    assert not untested, f"operations without a single case: {untested}"


# -- what the fuzzer found, one test each (its reproducer, made readable) --------------------------


def test_a_multipart_job_whose_request_field_is_not_json_is_a_422(server) -> None:
    """Was a 500 (``json.loads`` raised out of the handler): ``POST /v1/jobs`` multipart with an
    empty ``request`` field."""
    import httpx

    thread, key = server
    for raw in ("", "{", "not json"):
        answer = httpx.post(
            f"{thread.url}/v1/jobs",
            files={"request": (None, raw)},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "invalid_json"
        assert answer.json()["error"]["param"] == "request"


@pytest.mark.parametrize("path", ["/history?offset=29652814011267297280", f"/v1/workflows/any?version={2**70}"])
def test_an_integer_beyond_what_sql_holds_is_a_422(server, path: str) -> None:
    """Were 500s (``OverflowError: Python int too large to convert to SQLite INTEGER``): the
    first is the fuzzer's reproducer (seed 1), the second the same bug on another route."""
    import httpx

    thread, key = server
    answer = httpx.get(f"{thread.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert answer.status_code == 422, answer.text
    assert str(2**31 - 1) in answer.text  # the bound, named
