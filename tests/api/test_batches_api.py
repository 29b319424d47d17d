"""Bulk batches: a CSV/JSONL with a template; bad rows reported by line, good rows run, manifest in S3."""

from __future__ import annotations

import asyncio
import csv
import io
import json

import httpx
import pytest
from sqlalchemy import func, select

from tenants import add_tenant
from zimage_platform.scheduling.models import BatchRow, JobRow

FAST_DEFAULTS = {"steps": 2, "size": "64x64"}
CSV = """product,color,size,seed
sneakers,white,64x64,1
backpack,,64x64,2
watch,gold,999x999,3
mug,blue,,4
"""


async def test_csv_batch_with_template_overrides_and_bad_rows(client: httpx.AsyncClient):
    request = {"template": "studio photo of {product}, {color}", "defaults": {"steps": 2, "size": "64x64"}}
    response = await client.post(
        "/v1/batches",
        files={"file": ("catalogue.csv", CSV.encode(), "text/csv")},
        data={"request": json.dumps(request)},
    )
    assert response.status_code == 202, response.text
    batch = response.json()
    assert batch["total_rows"] == 4
    rejected = {r["line"]: r["code"] for r in batch["rejected"]}
    assert rejected == {3: "template_column_missing", 4: "unsupported_size"}
    async with asyncio.timeout(60):
        while batch["status"] != "completed":
            await asyncio.sleep(0.1)
            batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
    assert batch["counts"]["succeeded"] == 2 and batch["counts"]["rejected"] == 2
    assert [r["line"] for r in batch["rows"]] == [2, 5]
    manifest = list(csv.DictReader(io.StringIO(httpx.get(batch["manifest_url"]).text)))
    assert [(m["line"], m["status"]) for m in manifest] == [
        ("2", "succeeded"),
        ("3", "rejected"),
        ("4", "rejected"),
        ("5", "succeeded"),
    ]
    assert manifest[0]["seed"] == "1" and manifest[0]["s3_key"].endswith("/0.png") and len(manifest[0]["sha256"]) == 64


async def test_jsonl_batch_and_isolation(client: httpx.AsyncClient, keys):
    lines = (
        "\n".join(json.dumps({"prompt": f"item {i}", "size": "64x64", "steps": 2}) for i in range(3)) + "\n{broken\n"
    )
    response = await client.post("/v1/batches", files={"file": ("rows.jsonl", lines.encode())})
    batch = response.json()
    assert response.status_code == 202 and [r["line"] for r in batch["rejected"]] == [4]
    other = await client.get(f"/v1/batches/{batch['id']}", headers={"Authorization": f"Bearer {keys['globex']}"})
    assert other.status_code == 404


async def test_a_file_with_no_valid_row_is_refused(client: httpx.AsyncClient):
    response = await client.post("/v1/batches", files={"file": ("x.csv", b"prompt\n\n")})
    assert response.status_code == 422 and response.json()["error"]["code"] == "batch_empty"
    response = await client.post("/v1/batches", files={"file": ("x.csv", b"prompt,size\nhello,1x1\n")})
    assert response.json()["error"]["code"] == "batch_no_valid_rows"


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post_batch(client, csv_text: str, request: dict, **kw) -> httpx.Response:
    files = {"file": ("rows.csv", csv_text.encode(), "text/csv")}
    return await client.post("/v1/batches", files=files, data={"request": json.dumps(request)}, **kw)


@pytest.mark.parametrize(
    ("template", "placeholder"),
    [
        ("{product:>1000000000}", "{product:>1000000000}"),  # a format spec: a 1 GB string per row before
        ("{0}", "{0}"),  # positional: a 500 before
        ("{product.upper}", "{product.upper}"),  # attribute access: a 500 before
        ("{product[0]}", "{product[0]}"),
        ("{product!r}", "{product!r}"),
        ("{colour}", "{colour}"),  # no such column
    ],
)
async def test_a_template_is_only_column_placeholders(client: httpx.AsyncClient, template, placeholder):
    """Issue 12: the template is checked once, before any row: 400 naming the placeholder and the columns."""
    response = await post_batch(client, "product,color\nmug,blue\n", {"template": template})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "template_invalid" and error["param"] == "template"
    assert placeholder in error["message"] and error["choices"] == ["product", "color"]


async def test_a_template_with_an_unmatched_brace_is_refused(client: httpx.AsyncClient):
    response = await post_batch(client, "product\nmug\n", {"template": "a {product"})
    assert response.status_code == 400 and "'{{'" in response.json()["error"]["message"]


async def test_literal_braces_and_a_bounded_prompt(client: httpx.AsyncClient, api_config):
    """``{{``/``}}`` are literal braces; a filled prompt over ``limits.max_prompt_chars`` is that
    row's error (counted before the string is built), the other rows run."""
    long = "x" * (api_config.limits.max_prompt_chars // 4 + 1)
    rows = f"product\nmug\n{long}\n"
    request = {"template": "{{sku}} {product} {product} {product} {product}", "defaults": FAST_DEFAULTS}
    response = await post_batch(client, rows, request)
    assert response.status_code == 202, response.text
    batch = response.json()
    assert [(r["line"], r["code"], r["param"]) for r in batch["rejected"]] == [(3, "prompt_too_long", "prompt")]
    job = (await client.get(f"/v1/jobs/{batch['rows'][0]['job_id']}")).json()
    assert job["params"]["prompt"] == "{sku} mug mug mug mug"


async def test_rows_are_expanded_off_the_event_loop_with_one_webhook_check(
    client: httpx.AsyncClient, api_config, monkeypatch
):
    """Issue 12: row expansion runs in a worker thread (thousands of rows must not stall the
    ingress's event loop), and the webhook URL is resolved once per file, not once per row."""
    import socket
    import threading

    from zimage_platform.api.batches import serving

    loop_thread = threading.current_thread()
    threads: set[threading.Thread] = set()
    prepare = serving.prepare_job

    def recording(*args, **kwargs):
        threads.add(threading.current_thread())
        return prepare(*args, **kwargs)

    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host, *args, **kwargs):
        if host == "hooks.example.com":
            lookups.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 443))]
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(serving, "prepare_job", recording)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(api_config.webhooks, "allow_private", False)
    # Its quota refuses the file after the rows are expanded: nothing runs, no webhook is sent.
    key = add_tenant(api_config, "batch-hooks", limits={"monthly_images": 1})
    rows = "prompt\n" + "".join(f"item {i}\n" for i in range(5))
    request = {"defaults": FAST_DEFAULTS, "webhook_url": "https://hooks.example.com/batch"}
    response = await post_batch(client, rows, request, headers=as_(key))
    assert response.status_code == 429 and response.json()["error"]["code"] == "quota_exceeded"
    assert threads and loop_thread not in threads
    assert lookups == ["hooks.example.com"]


async def test_a_batch_spends_the_tenants_images_per_minute(client: httpx.AsyncClient, api_config, platform):
    """Issue 12, item 9: batches no longer skip images per minute. A file with more images than a
    minute's worth is admitted into an empty window and spends all of it."""
    key = add_tenant(api_config, "batch-ipm", limits={"images_per_minute": 3})
    rows = "prompt\n" + "".join(f"item {i}\n" for i in range(4))
    first = await post_batch(client, rows, {"defaults": FAST_DEFAULTS}, headers=as_(key))
    assert first.status_code == 202, first.text
    second = await post_batch(client, "prompt\nmore\n", {"defaults": FAST_DEFAULTS}, headers=as_(key))
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limited"
    assert second.headers["x-ratelimit-kind"] == "images" and int(second.headers["retry-after"]) >= 1
    assert batch_rows(platform, "batch-ipm") == 1


async def test_one_tenants_batch_cannot_fill_the_class_queue(client: httpx.AsyncClient, api_config, platform):
    """Issue 12: a batch over the tenant's share of its class queue (half the bound by default)
    gets 429 ``tenant_queue_share`` with Retry-After and leaves no batch row and no job; another
    tenant of the class is still admitted."""
    bound = api_config.pools["cpu"].queue_bound["standard"]
    key = add_tenant(api_config, "batch-flood", priority_class="standard")
    n = api_config.limits.max_images_per_request
    rows = "prompt\n" + "".join(f"item {i}\n" for i in range(bound // 2 // n + 1))
    flood = await post_batch(client, rows, {"defaults": {**FAST_DEFAULTS, "n": n}}, headers=as_(key))
    assert flood.status_code == 429, flood.text
    assert flood.json()["error"]["code"] == "tenant_queue_share" and int(flood.headers["retry-after"]) >= 1
    assert batch_rows(platform, "batch-flood") == 0
    assert (await client.get("/v1/jobs", headers=as_(key))).json()["data"] == []
    other = await post_batch(client, "prompt\nmug\n", {"defaults": FAST_DEFAULTS})
    assert other.status_code == 202


async def test_an_idempotency_key_gives_the_same_batch(client: httpx.AsyncClient, platform):
    """Issue 12: same key + same request and file → the same batch (200), written once; another
    request with the key → 409."""
    request = {"defaults": FAST_DEFAULTS}
    headers = {"Idempotency-Key": "catalogue-2026-12"}
    first = await post_batch(client, "prompt\nmug\n", request, headers=headers)
    again = await post_batch(client, "prompt\nmug\n", request, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and len(again.json()["rows"]) == 1
    other = await post_batch(client, "prompt\ncup\n", request, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    with platform.services.store.session() as s:
        jobs = s.scalar(select(func.count()).select_from(JobRow).where(JobRow.batch_id == first.json()["id"]))
    assert jobs == 1


def batch_rows(platform, tenant_id: str) -> int:
    with platform.services.store.session() as s:
        return s.scalar(select(func.count()).select_from(BatchRow).where(BatchRow.tenant_id == tenant_id))


async def test_non_finite_numbers_are_refused_in_the_request_and_in_rows(client: httpx.AsyncClient):
    """Python's json reads NaN/Infinity; they are not JSON and could not be sent back: the request
    field is refused whole, a file row with one is a row error (the other rows run)."""
    files = {"file": ("rows.jsonl", b'{"prompt": "a", "size": "64x64", "steps": 2}\n')}
    refused = await client.post("/v1/batches", files=files, data={"request": '{"defaults": {"guidance": NaN}}'})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "non_finite_number"
    rows = b'{"prompt": "a", "size": "64x64", "steps": 2}\n{"prompt": "b", "size": "64x64", "guidance": Infinity}\n'
    response = await client.post("/v1/batches", files={"file": ("rows.jsonl", rows)})
    assert response.status_code == 202, response.text
    assert [r["line"] for r in response.json()["rejected"]] == [2]
