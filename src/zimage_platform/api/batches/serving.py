"""Serving logic of bulk batches: parse rows, fill the template, validate each row, queue the good ones.

A bad row is reported with its line number and the good rows still run. The whole file is
admitted or refused as one (a queue that cannot take it all answers 429 before anything is written).
"""

from __future__ import annotations

import csv
import io
import json
import string
from typing import Any

from zimage_platform.api.batches.protocol import BatchRequest
from zimage_platform.api.generation import prepare_job
from zimage_platform.api.services import PlatformServices
from zimage_platform.db import utcnow
from zimage_platform.errors import InvalidRequest, PlatformError
from zimage_platform.pipeline.params import GenerationParams
from zimage_platform.scheduling.models import BatchRow
from zimage_platform.scheduling.store import NewJob, new_id
from zimage_platform.telemetry.context import RequestTrace
from zimage_platform.tenancy import TenantSpec

OVERRIDES = ("variant", "size", "seed", "steps", "guidance", "negative_prompt", "sampler", "scheduler", "n")
_FORMATTER = string.Formatter()


def read_rows(data: bytes, filename: str, max_rows: int) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` pairs from CSV (header line 1) or JSONL (one object per line)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidRequest("the file is not UTF-8 text", code="batch_file_unreadable", param="file") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    if filename.lower().endswith((".jsonl", ".ndjson")):
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    value = json.loads(line)
                except ValueError:
                    value = {"__error__": "not valid JSON"}
                rows.append((line_no, value if isinstance(value, dict) else {"__error__": "not a JSON object"}))
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            raise InvalidRequest("the CSV file has no header row", code="batch_file_unreadable", param="file")
        rows = [(reader.line_num, dict(row)) for row in reader if any((v or "").strip() for v in row.values())]
    if not rows:
        raise InvalidRequest("the file has no rows", code="batch_empty", param="file")
    if len(rows) > max_rows:
        raise InvalidRequest(f"{len(rows)} rows; the limit is {max_rows}", code="batch_too_large", param="file")
    return rows


def fill(template: str, row: dict[str, Any]) -> str:
    """``{column}`` substitution; a placeholder without a column is the row's error."""
    names = [name for _, name, _, _ in _FORMATTER.parse(template) if name]
    missing = [n for n in names if row.get(n) in (None, "")]
    if missing:
        raise InvalidRequest(
            f"the template needs column(s) {missing}", code="template_column_missing", param=missing[0]
        )
    return template.format_map({k: row[k] for k in names})


def _number(row: dict[str, Any], name: str, cast):
    value = row.get(name)
    if value in (None, ""):
        return None
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise InvalidRequest(
            f"column {name!r} is not a number: {value!r}", code="invalid_parameter", param=name
        ) from None


def row_params(request: BatchRequest, row: dict[str, Any]) -> tuple[str, GenerationParams]:
    if "__error__" in row:
        raise InvalidRequest(row["__error__"], code="row_unreadable")
    d = request.defaults
    prompt = fill(request.template, row) if request.template else str(row.get("prompt") or "")
    variant = str(row.get("variant") or d.variant)
    return variant, GenerationParams(
        prompt=prompt,
        size=str(row.get("size") or d.size or "") or None,
        n=_number(row, "n", int) or d.n,
        seed=_number(row, "seed", int) if row.get("seed") not in (None, "") else d.seed,
        steps=_number(row, "steps", int) or d.steps,
        guidance=_number(row, "guidance", float) if row.get("guidance") not in (None, "") else d.guidance,
        negative_prompt=str(row.get("negative_prompt") or d.negative_prompt or "") or None,
        sampler=str(row.get("sampler") or d.sampler or "") or None,
        scheduler=str(row.get("scheduler") or d.scheduler or "") or None,
    )


async def create_batch(
    services: PlatformServices,
    tenant: TenantSpec,
    request: BatchRequest,
    data: bytes,
    filename: str,
    trace: RequestTrace,
) -> dict[str, Any]:
    rows = read_rows(data, filename, services.config.limits.max_batch_rows)
    batch_id = new_id("batch")
    jobs: list[NewJob] = []
    rejected: list[dict[str, Any]] = []
    for line, row in rows:
        try:
            variant, params = row_params(request, row)
            jobs.append(
                prepare_job(
                    services,
                    tenant,
                    variant,
                    params,
                    source="batch",
                    trace=trace,
                    webhook_url=request.webhook_url,
                    batch_id=batch_id,
                    batch_row=line,
                )
            )
        except PlatformError as exc:
            rejected.append({"line": line, "code": exc.code, "message": exc.message, "param": exc.param})
    if not jobs:
        raise InvalidRequest("no row of the file is valid", code="batch_no_valid_rows", param="file", choices=None)
    services.store.create_batch(
        BatchRow(
            id=batch_id,
            tenant_id=tenant.id,
            status="running",
            template=request.template,
            total_rows=len(rows),
            rejected=rejected,
            webhook_url=request.webhook_url,
            created_at=utcnow(),
        )
    )
    await services.scheduler.submit_many(jobs)
    return get_batch(services, tenant, batch_id)


def get_batch(
    services: PlatformServices, tenant: TenantSpec, batch_id: str, offset: int = 0, limit: int = 1000
) -> dict:
    batch = services.store.get_batch(batch_id, tenant.id)
    jobs = services.store.batch_jobs(batch_id)
    counts = {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    for job in jobs:
        counts[job.status] += 1
    counts["rejected"] = len(batch.rejected)
    return {
        "id": batch.id,
        "object": "batch",
        "status": batch.status,
        "total_rows": batch.total_rows,
        "counts": counts,
        "rejected": batch.rejected,
        "rows": [
            {"line": j.batch_row, "job_id": j.id, "status": j.status, "error_code": j.error_code}
            for j in jobs[offset : offset + limit]
        ],
        "manifest_url": services.results.presign_get(batch.manifest_key) if batch.manifest_key else None,
        "created_at": batch.created_at,
        "finished_at": batch.finished_at,
    }
