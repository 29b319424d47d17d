"""Serving logic of bulk batches: parse rows, fill the template, validate each row, queue the good ones.

A bad row is reported with its line number and the good rows still run. The whole file is
admitted or refused as one, like one job (images per minute, the queue bound and the tenant's
share of it, one concurrency slot, quota): the batch row and its jobs are written in one
transaction, so a refused file leaves nothing behind. Parsing and row expansion are CPU work
over up to ``limits.max_batch_rows`` rows: they run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from zimage_platform.api.batches.protocol import BatchRequest
from zimage_platform.api.body import NonFiniteNumber, loads
from zimage_platform.api.generation import prepare_job, request_hash, submit_batch
from zimage_platform.api.services import PlatformServices
from zimage_platform.db import utcnow
from zimage_platform.errors import InvalidRequest, PlatformError
from zimage_platform.netsafe import WEBHOOK_URLS
from zimage_platform.pipeline.params import GenerationParams
from zimage_platform.scheduling.models import BatchRow
from zimage_platform.scheduling.store import BatchExists, IdempotencyConflict, NewJob, new_id
from zimage_platform.telemetry.context import RequestTrace
from zimage_platform.tenancy import TenantSpec

#: ``{{`` / ``}}`` (a literal brace), ``{column}``, or a brace without its pair.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
#: What str.format would read inside a placeholder: a format spec, a conversion, attribute or index access.
_FORMAT_SYNTAX = re.compile(r"[:!.\[\]]")


class TemplateInvalid(InvalidRequest):
    """The template is refused before any row is read (400, naming the placeholder and the columns)."""

    code = "template_invalid"
    status = 400


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt with ``{column}`` placeholders, nothing else: no format specs, conversions,
    attribute or index access (a tenant's template must not make the platform build a gigabyte
    string or read object attributes); ``{{`` and ``}}`` are literal braces."""

    #: Literal text, and ``None`` marking where the next placeholder goes.
    parts: tuple[str | None, ...]
    names: tuple[str, ...]
    literal_chars: int

    @classmethod
    def parse(cls, template: str, columns: Sequence[str], max_chars: int) -> PromptTemplate:
        parts: list[str | None] = []
        names: list[str] = []
        text: list[str] = []
        at = 0
        for match in _TOKEN.finditer(template):
            text.append(template[at : match.start()])
            at = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                text.append(token[0])
                continue
            name = match.group(1)
            if name is None:
                raise TemplateInvalid(
                    f"the template has an unmatched {token!r} at position {match.start()}; "
                    f"write {token * 2!r} for a literal brace",
                    param="template",
                    choices=columns,
                )
            if name not in columns:
                why = (
                    "only {column} placeholders are supported (no format specs, conversions, attribute or index access)"
                    if _FORMAT_SYNTAX.search(name)
                    else "the file has no such column"
                )
                raise TemplateInvalid(
                    f"the template's placeholder {{{name}}} is not valid: {why}; the columns are {list(columns)}",
                    param="template",
                    choices=columns,
                )
            parts += ["".join(text), None]
            names.append(name)
            text = []
        parts.append("".join(text) + template[at:])
        literal = sum(len(p) for p in parts if p is not None)
        if literal > max_chars:
            raise TemplateInvalid(
                f"the template has {literal} characters besides its placeholders; a prompt may have {max_chars}",
                code="template_too_long",
                param="template",
            )
        return cls(tuple(parts), tuple(names), literal)

    def fill(self, row: dict[str, Any], max_chars: int) -> str:
        """The row's prompt; a missing column or a prompt over ``max_chars`` is the row's error
        (the length is known before the string is built)."""
        values = [row.get(name) for name in self.names]
        missing = [n for n, v in zip(self.names, values, strict=True) if v in (None, "")]
        if missing:
            raise InvalidRequest(
                f"the template needs column(s) {missing}", code="template_column_missing", param=missing[0]
            )
        texts = [v if isinstance(v, str) else json.dumps(v) for v in values]
        length = self.literal_chars + sum(len(t) for t in texts)
        if length > max_chars:
            raise InvalidRequest(
                f"the filled template has {length} characters; the limit is {max_chars}",
                code="prompt_too_long",
                param="prompt",
            )
        filled = iter(texts)
        return "".join(part if part is not None else next(filled) for part in self.parts)


def read_rows(data: bytes, filename: str, max_rows: int) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """``(line number, row)`` pairs from CSV (header line 1) or JSONL (one object per line), and
    the file's column names (the CSV header; every key of a JSONL row)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidRequest("the file is not UTF-8 text", code="batch_file_unreadable", param="file") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    columns: dict[str, None] = {}
    if filename.lower().endswith((".jsonl", ".ndjson")):
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    value = loads(line)
                except NonFiniteNumber:
                    value = {"__error__": "a number is NaN or infinite"}
                except ValueError:
                    value = {"__error__": "not valid JSON"}
                if isinstance(value, dict):
                    columns.update(dict.fromkeys(value))
                rows.append((line_no, value if isinstance(value, dict) else {"__error__": "not a JSON object"}))
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            raise InvalidRequest("the CSV file has no header row", code="batch_file_unreadable", param="file")
        columns.update(dict.fromkeys(reader.fieldnames))
        for row in reader:
            if None in row:  # more fields than the header names
                rows.append((reader.line_num, {"__error__": "the row has more fields than the header"}))
            elif any((v or "").strip() for v in row.values()):
                rows.append((reader.line_num, dict(row)))
    if not rows:
        raise InvalidRequest("the file has no rows", code="batch_empty", param="file")
    if len(rows) > max_rows:
        raise InvalidRequest(f"{len(rows)} rows; the limit is {max_rows}", code="batch_too_large", param="file")
    columns.pop("__error__", None)
    return rows, list(columns)


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


def row_params(
    request: BatchRequest, template: PromptTemplate | None, row: dict[str, Any], max_chars: int
) -> tuple[str, GenerationParams]:
    if "__error__" in row:
        raise InvalidRequest(row["__error__"], code="row_unreadable")
    d = request.defaults
    prompt = template.fill(row, max_chars) if template is not None else str(row.get("prompt") or "")
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


def expand(
    services: PlatformServices,
    tenant: TenantSpec,
    request: BatchRequest,
    rows: Iterable[tuple[int, dict[str, Any]]],
    template: PromptTemplate | None,
    batch_id: str,
    trace: RequestTrace,
) -> tuple[list[NewJob], list[dict[str, Any]]]:
    """Each row → a validated job, or its rejection with the line number (in a worker thread)."""
    max_chars = services.config.limits.max_prompt_chars
    jobs: list[NewJob] = []
    rejected: list[dict[str, Any]] = []
    for line, row in rows:
        try:
            variant, params = row_params(request, template, row, max_chars)
            jobs.append(
                prepare_job(
                    services,
                    tenant,
                    variant,
                    params,
                    source="batch",
                    trace=trace,
                    webhook_url=request.webhook_url,
                    webhook_checked=True,
                    batch_id=batch_id,
                    batch_row=line,
                )
            )
        except PlatformError as exc:
            rejected.append({"line": line, "code": exc.code, "message": exc.message, "param": exc.param})
    return jobs, rejected


def _parse(
    services: PlatformServices,
    tenant: TenantSpec,
    request: BatchRequest,
    data: bytes,
    filename: str,
    batch_id: str,
    trace: RequestTrace,
) -> tuple[int, list[NewJob], list[dict[str, Any]]]:
    limits = services.config.limits
    rows, columns = read_rows(data, filename, limits.max_batch_rows)
    template = PromptTemplate.parse(request.template, columns, limits.max_prompt_chars) if request.template else None
    return len(rows), *expand(services, tenant, request, rows, template, batch_id, trace)


def _replayed(services: PlatformServices, tenant: TenantSpec, key: str, body_hash: str) -> dict[str, Any] | None:
    """The batch an earlier request with this Idempotency-Key wrote (409 if its body differed)."""
    batch = services.store.find_batch(tenant.id, key)
    if batch is None:
        return None
    if batch.request_hash != body_hash:
        raise IdempotencyConflict(
            "this Idempotency-Key was used with a different request body", param="Idempotency-Key"
        )
    return get_batch(services, tenant, batch.id)


async def create_batch(
    services: PlatformServices,
    tenant: TenantSpec,
    request: BatchRequest,
    data: bytes,
    filename: str,
    trace: RequestTrace,
    *,
    idempotency_key: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """``(batch, created)``: same Idempotency-Key + same request and file → the earlier batch."""
    body_hash = request_hash({"request": request.model_dump(mode="json"), "filename": filename}, data)
    if idempotency_key and (
        earlier := await asyncio.to_thread(_replayed, services, tenant, idempotency_key, body_hash)
    ):
        return earlier, False
    if request.webhook_url is not None:  # one look-up for the file, not one per row
        await WEBHOOK_URLS.validate_async(request.webhook_url, allow_private=services.config.webhooks.allow_private)
    batch_id = new_id("batch")
    total, jobs, rejected = await asyncio.to_thread(_parse, services, tenant, request, data, filename, batch_id, trace)
    if not jobs:
        raise InvalidRequest("no row of the file is valid", code="batch_no_valid_rows", param="file", choices=None)
    batch = BatchRow(
        id=batch_id,
        tenant_id=tenant.id,
        status="running",
        template=request.template,
        total_rows=total,
        rejected=rejected,
        webhook_url=request.webhook_url,
        idempotency_key=idempotency_key,
        request_hash=body_hash,
        created_at=utcnow(),
    )
    try:
        await submit_batch(services, tenant, jobs, batch)
    except PlatformError as exc:
        # Over Ray the scheduler's errors come back as PlatformError with their code.
        if exc.code != BatchExists.code or not idempotency_key:
            raise
        earlier = await asyncio.to_thread(_replayed, services, tenant, idempotency_key, body_hash)
        if earlier is None:
            raise
        return earlier, False
    return await asyncio.to_thread(get_batch, services, tenant, batch_id), True


def get_batch(
    services: PlatformServices, tenant: TenantSpec, batch_id: str, offset: int = 0, limit: int = 1000
) -> dict:
    """The batch as callers see it (blocking: database reads; callers run it in a worker thread)."""
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
