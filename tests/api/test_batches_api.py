"""Bulk batches: a CSV/JSONL with a template; bad rows reported by line, good rows run, manifest in S3."""

from __future__ import annotations

import asyncio
import csv
import io
import json

import httpx

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
