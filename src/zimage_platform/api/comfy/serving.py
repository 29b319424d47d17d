"""Serving logic of the ComfyUI-compatible API: prompts as platform jobs, queue and history
from the job store, files from S3, and the WebSocket event relay.

A prompt is one row (:class:`~zimage_platform.workflows.models.ComfyPromptRow`) that points at
the platform jobs it compiled into; its queue state, history and outputs are read from those
jobs every time, so any ingress replica answers the same, before and after restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import platform
import re
import secrets
import string
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
from fastapi import WebSocket, WebSocketDisconnect
from PIL import Image
from sqlalchemy.exc import IntegrityError

from zimage_platform import __version__
from zimage_platform.api.comfy import protocol
from zimage_platform.api.comfy.events import Connection, PromptRelay, SocketHub
from zimage_platform.api.comfy.protocol import ComfyError
from zimage_platform.api.frontend.serving import package_version
from zimage_platform.api.generation import image_limits, submit
from zimage_platform.api.graphs import NodeRejected, catalog_for, prepare_jobs, split_image_name
from zimage_platform.api.services import PlatformServices
from zimage_platform.api.streams import Stream
from zimage_platform.db import utcnow
from zimage_platform.errors import PlatformError
from zimage_platform.pipeline.images import decode_image, sniff_media_type
from zimage_platform.scheduling.models import TERMINAL, JobRow
from zimage_platform.scheduling.store import JobFinished, JobNotFound, NewJob
from zimage_platform.storage.results import sha256_hex
from zimage_platform.telemetry.context import RequestTrace
from zimage_platform.tenancy import TenantSpec
from zimage_platform.workflows import CompiledPrompt, PlannedJob, PromptRejected, compile_prompt, object_info
from zimage_platform.workflows.catalog import MODEL_FOLDERS
from zimage_platform.workflows.compiler import SAVE_NODES
from zimage_platform.workflows.models import ComfyFileRow, ComfyPromptRow
from zimage_platform.workflows.store import ComfyStore, Upload, content_hash
from zimage_platform.workflows.validation import StoredTooLarge, check_stored_size, comfy_error

log = logging.getLogger(__name__)

#: How often a socket looks for prompts its client submitted through another replica: often
#: while the client is active, less when it has been quiet for a while.
POLL_S = 0.25
IDLE_POLL_S = 1.0
IDLE_AFTER = timedelta(seconds=60)
#: A prompt whose jobs are still missing this long after it was written was never queued.
SUBMIT_GRACE = timedelta(seconds=60)
_PROMPT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_FOLDERS = ("input", "output", "temp")


# -- a prompt's state, from its jobs ------------------------------------------------------------


@dataclass
class PromptView:
    row: ComfyPromptRow
    jobs: list[JobRow | None]
    #: pending | running | success | error | interrupted
    state: str
    #: The job that decided an error / interruption (index into the plan), with its reason.
    culprit: int | None = None
    code: str | None = None
    reason: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: Whether any job started, when known without the job rows (from events).
    started: bool | None = None

    @property
    def terminal(self) -> bool:
        return self.state in ("success", "error", "interrupted")

    @property
    def never_started(self) -> bool:
        if self.started is not None:
            return not self.started
        return all(job is None or job.started_at is None for job in self.jobs)


def prompt_view(row: ComfyPromptRow, jobs: dict[str, JobRow], now: datetime | None = None) -> PromptView:
    listed = [jobs.get(job_id) for job_id in row.job_ids]
    now = now or utcnow()
    missing = [i for i, job in enumerate(listed) if job is None]
    started = [j.started_at for j in listed if j is not None and j.started_at is not None]
    view = PromptView(row, listed, "pending", started_at=min(started) if started else None)
    if missing and now - row.created_at < SUBMIT_GRACE:
        view.state = "running" if started else "pending"
        return view
    present = [j for j in listed if j is not None]
    if missing or all(j.status in TERMINAL for j in present):
        finished = [j.finished_at for j in present if j.finished_at is not None]
        view.finished_at = max(finished) if finished else now
        failed = next((i for i, j in enumerate(listed) if j is not None and j.status == "failed"), None)
        cancelled = next((i for i, j in enumerate(listed) if j is not None and j.status == "cancelled"), None)
        if missing:
            view.state, view.culprit = "error", missing[0]
            view.code, view.reason = (
                "submission_lost",
                "the prompt was not queued: the server stopped while accepting it",
            )
        elif failed is not None:
            job = listed[failed]
            view.state, view.culprit, view.code, view.reason = "error", failed, job.error_code, job.error_message
        elif cancelled is not None:
            job = listed[cancelled]
            view.state, view.culprit, view.code, view.reason = "interrupted", cancelled, job.error_code, None
        else:
            view.state = "success"
        return view
    view.state = "running" if started or any(j.status != "queued" for j in present) else "pending"
    return view


def view_from_events(row: ComfyPromptRow, ends: dict[int, dict[str, Any]], started: bool) -> PromptView:
    """A finished prompt's outcome from its jobs' terminal events (the scheduler writes a job's
    row before it announces its end, so this agrees with what ``prompt_view`` reads)."""
    view = PromptView(row, [None] * len(row.job_ids), "success", finished_at=utcnow(), started=started)
    failed = sorted(i for i, e in ends.items() if e["type"] == "failed")
    cancelled = sorted(i for i, e in ends.items() if e["type"] == "cancelled")
    if failed:
        end = ends[failed[0]]
        view.state, view.culprit, view.code, view.reason = (
            "error",
            failed[0],
            end.get("error_code"),
            end.get("error_message"),
        )
    elif cancelled:
        view.state, view.culprit, view.code = "interrupted", cancelled[0], ends[cancelled[0]].get("reason")
    return view


def _executed_before(plan_job: dict[str, Any], node: str) -> list[str]:
    """Nodes a job had run when it stopped at ``node`` (ComfyUI lists the most recent first)."""
    ordered = [*plan_job["pre"], *plan_job["passes"].values()]
    return list(reversed(ordered[: ordered.index(node)] if node in ordered else plan_job["pre"]))


def terminal_message(view: PromptView, stopped_at: str | None = None) -> dict[str, Any] | None:
    """The outcome message of a finished prompt; ``None`` for one deleted from the queue unrun."""
    row, ts = view.row, protocol.ms(view.finished_at)
    if view.state == "success":
        return protocol.execution_success(row.prompt_id, ts)
    if view.state == "interrupted" and (row.queue_deleted or view.never_started):
        return None
    job = row.plan["jobs"][view.culprit or 0]
    node = stopped_at or job["passes"].get("base") or job["passes"]["generate"]
    node_type = row.plan["class_types"].get(node, "KSampler")
    executed = _executed_before(job, node)
    if view.state == "interrupted":
        return protocol.execution_interrupted(row.prompt_id, node, node_type, executed, ts)
    return protocol.execution_error(
        row.prompt_id, node, node_type, executed, view.code or "generation_failed", view.reason or "", ts
    )


def queue_item(row: ComfyPromptRow, *, bodies: bool = True) -> list[Any]:
    """The prompt as ComfyUI's queue tuple; ``bodies=False`` for a row read without its graph
    and extra_data (they are then empty)."""
    graph, extra_data = (row.graph, row.extra_data) if bodies else ({}, {})
    return protocol.queue_item(row.number, row.prompt_id, graph, extra_data, row.outputs_to_execute)


def history_entry(view: PromptView, *, bodies: bool = True) -> dict[str, Any]:
    row = view.row
    outputs: dict[str, Any] = {}
    for plan_job, job in zip(row.plan["jobs"], view.jobs, strict=True):
        done = {image.index for image in job.images if image.status == "done"} if job is not None else set()
        for node, files in plan_job["outputs"].items():
            images = [protocol.image_ref(f["filename"], f["subfolder"], f["type"]) for f in files if f["index"] in done]
            if images:
                outputs.setdefault(node, {"images": []})["images"] += images
    started = protocol.ms(view.started_at or row.created_at)
    messages = [
        protocol.history_message(protocol.execution_start(row.prompt_id, started)),
        protocol.history_message(protocol.execution_cached(row.prompt_id, started)),
    ]
    final = terminal_message(view)
    if final is not None:
        messages.append(protocol.history_message(final))
    item = queue_item(row, bodies=bodies)
    success = view.state == "success"
    return protocol.history_entry(item, outputs, "success" if success else "error", success, messages)


# -- output file names ------------------------------------------------------------------------

_DATE_TOKENS = (("yyyy", "%Y"), ("yy", "%y"), ("MM", "%m"), ("dd", "%d"), ("hh", "%H"), ("mm", "%M"), ("ss", "%S"))


def format_prefix(prefix: str, width: int, height: int, now: datetime | None = None) -> tuple[str, str]:
    """ComfyUI's SaveImage prefix: ``%date:yyyy-MM-dd%``, ``%width%``/``%height%``, and a
    subfolder before the last ``/``. Returns ``(subfolder, prefix)``."""
    now = now or datetime.now(UTC)

    def date(match: re.Match) -> str:
        fmt = match.group(1)
        for token, directive in _DATE_TOKENS:
            fmt = fmt.replace(token, directive)
        return now.strftime(fmt)

    text = re.sub(r"%date:([^%]+)%", date, prefix)
    text = text.replace("%width%", str(width)).replace("%height%", str(height))
    text = text.replace("%year%", f"{now:%Y}").replace("%month%", f"{now:%m}").replace("%day%", f"{now:%d}")
    text = text.replace("%hour%", f"{now:%H}").replace("%minute%", f"{now:%M}").replace("%second%", f"{now:%S}")
    subfolder, _, name = text.replace("\\", "/").rpartition("/")
    return subfolder.strip("/"), name or "ComfyUI"


def output_name(node_class: str, prefix: str, counter: int, batch_number: int) -> str:
    """ComfyUI's file name for an output image (``%batch_num%`` in the prefix is the image's
    index in the batch): SaveImage and PreviewImage write ``prefix_00001_.png``,
    SaveImageAdvanced ``prefix_00001.png``."""
    name = prefix.replace("%batch_num%", str(batch_number))
    return f"{name}_{counter:05}.png" if node_class == "SaveImageAdvanced" else f"{name}_{counter:05}_.png"


def png_text(prompt: Any, extra_data: dict[str, Any]) -> dict[str, str]:
    """The PNG text chunks ComfyUI's SaveImage writes: ``prompt`` (the API prompt as JSON) and one
    per ``extra_data.extra_pnginfo`` key (the frontend sends ``workflow``), so an image dragged
    back into ComfyUI restores the prompt and its workflow."""
    text = {"prompt": json.dumps(prompt)}
    extra = extra_data.get("extra_pnginfo")
    if isinstance(extra, dict):
        text.update({str(key): json.dumps(value) for key, value in extra.items()})
    return text


def _temp_prefix() -> str:
    return "ComfyUI_temp_" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))


# -- the service --------------------------------------------------------------------------------


class ComfyService:
    """Everything behind the ComfyUI routes of one ingress replica."""

    def __init__(self, services: PlatformServices) -> None:
        self.services = services
        self.store = ComfyStore(services.store.engine)
        self.sockets = SocketHub()
        self._tasks: set[asyncio.Task] = set()

    # -- reading prompts ----------------------------------------------------------------------

    async def _views(self, rows: list[ComfyPromptRow]) -> list[PromptView]:
        jobs = await asyncio.to_thread(self.store.jobs, [j for row in rows for j in row.job_ids])
        now = utcnow()
        return [prompt_view(row, jobs, now) for row in rows]

    async def _record_finished(self, views: list[PromptView]) -> None:
        for view in views:
            if view.terminal and view.row.finished_at is None:
                await asyncio.to_thread(
                    self.store.finish, view.row.tenant_id, view.row.prompt_id, view.state, view.finished_at
                )

    async def queue(self, tenant: TenantSpec | str) -> tuple[list[PromptView], list[PromptView]]:
        """(running, pending) prompts; prompts found finished are recorded so on the way."""
        tenant_id = tenant if isinstance(tenant, str) else tenant.id
        views = await self._views(await asyncio.to_thread(self.store.unfinished, tenant_id))
        await self._record_finished(views)
        running = [v for v in views if v.state == "running"]
        pending = [v for v in views if v.state == "pending"]
        return running, pending

    async def remaining(self, tenant: TenantSpec | str) -> int:
        """ComfyUI's ``queue_remaining``: the tenant's running and pending prompts."""
        running, pending = await self.queue(tenant)
        return len(running) + len(pending)

    async def queue_body(self, tenant: TenantSpec) -> dict[str, Any]:
        """``GET /queue``: running, then pending prompts in queue order, at most
        ``limits.max_page_items`` of each and ``limits.max_listing_bytes`` of graphs in all
        (``queue_remaining`` of ``GET /prompt`` still counts every one)."""
        running, pending = await self.queue(tenant)
        cap = self.services.config.limits.max_page_items
        listed = {v.row.prompt_id for v in await self._with_bodies(tenant.id, running[:cap] + pending[:cap])}
        return {
            "queue_running": [queue_item(v.row) for v in running[:cap] if v.row.prompt_id in listed],
            "queue_pending": [queue_item(v.row) for v in pending[:cap] if v.row.prompt_id in listed],
        }

    async def _with_bodies(self, tenant_id: str, views: list[PromptView], *, keep_last: bool = False):
        """``views`` (in order) with their rows read again in full, as many as fit in
        ``limits.max_listing_bytes`` of graph + extra_data (the first ones, or the last ones with
        ``keep_last``; always at least one): a listing never holds more than that."""
        budget = self.services.config.limits.max_listing_bytes
        ids = [v.row.prompt_id for v in views]
        sizes = await asyncio.to_thread(self.store.body_sizes, tenant_id, ids)
        chosen: set[str] = set()
        for prompt_id in reversed(ids) if keep_last else ids:
            budget -= sizes.get(prompt_id, 0)
            if budget < 0 and chosen:
                break
            chosen.add(prompt_id)
        full = {row.prompt_id: row for row in await asyncio.to_thread(self.store.prompts, tenant_id, chosen)}
        kept = []
        for view in views:
            if view.row.prompt_id in full:
                view.row = full[view.row.prompt_id]
                kept.append(view)
        return kept

    async def history(
        self,
        tenant: TenantSpec,
        prompt_id: str | None = None,
        *,
        max_items: int | None = None,
        offset: int | None = None,
    ) -> dict[str, Any]:
        if prompt_id is not None:
            row = await asyncio.to_thread(self.store.prompt, tenant.id, prompt_id)
            if row is None or row.queue_deleted or row.history_deleted:
                return {}
            (view,) = await self._views([row])
            await self._record_finished([view])
            if not view.terminal or (view.state == "interrupted" and view.never_started):
                return {}
            return {prompt_id: history_entry(view)}
        await self.queue(tenant)  # record prompts that finished unobserved, so they are listed
        limits = self.services.config.limits
        page = min(limits.history_page_items if max_items is None else max_items, limits.max_page_items)
        rows = await asyncio.to_thread(self.store.history, tenant.id, max_items=page, offset=offset)
        views = [v for v in await self._views(rows) if not (v.state == "interrupted" and v.never_started)]
        # "The last N" keeps the newest within the byte budget; a page from an offset, the first.
        views = await self._with_bodies(tenant.id, views, keep_last=offset is None or offset < 0)
        return {view.row.prompt_id: history_entry(view) for view in views}

    # -- the jobs API --------------------------------------------------------------------------

    async def jobs(
        self, tenant: TenantSpec, statuses: list[str], *, limit: int | None, offset: int, newest_first: bool = True
    ) -> dict[str, Any]:
        """``GET /api/jobs``: the tenant's prompts as jobs, newest first, one page of them
        (``limits.history_page_items`` by default, at most ``limits.max_page_items``). Rows are
        read without their graphs; only the page's workflow ids are read from extra_data."""
        limits = self.services.config.limits
        limit = min(limits.history_page_items if limit is None else limit, limits.max_page_items)
        found: list[dict[str, Any]] = []
        running, pending = await self.queue(tenant)
        for state, views in (("in_progress", running), ("pending", pending)):
            if state in statuses:
                found += [self._queued_job(view, state, bodies=False) for view in views]
        wanted = protocol.HISTORY_STATUSES & set(statuses)
        history_total = 0
        if wanted:
            # Every history status asked for: only the page's window is read (and counted apart).
            window = offset + limit if wanted == protocol.HISTORY_STATUSES else None
            rows = await asyncio.to_thread(self.store.history, tenant.id, max_items=window, offset=None)
            views = [v for v in await self._views(rows) if not (v.state == "interrupted" and v.never_started)]
            finished = [
                protocol.finished_job(history_entry(v, bodies=False), protocol.ms(v.row.created_at)) for v in views
            ]
            finished = [job for job in finished if job["status"] in wanted]
            if window is not None:
                history_total = await asyncio.to_thread(self.store.history_count, tenant.id) - len(finished)
            found += finished
        found.sort(key=lambda job: job["create_time"], reverse=newest_first)
        total = len(found) + history_total
        page = found[offset : offset + limit]
        workflows = await asyncio.to_thread(self.store.workflow_ids, tenant.id, [job["id"] for job in page])
        for job in page:
            if workflows.get(job["id"]) is not None:
                job["workflow_id"] = workflows[job["id"]]
        return {
            "jobs": page,
            "pagination": {
                "offset": offset,
                "limit": limit,
                "total": total,
                "has_more": offset + len(page) < total,
            },
        }

    @staticmethod
    def _queued_job(view: PromptView, status: str, *, detail: bool = False, bodies: bool = True) -> dict[str, Any]:
        item = queue_item(view.row, bodies=bodies)
        return protocol.queued_job(item, status, protocol.ms(view.row.created_at), detail=detail)

    async def job(self, tenant: TenantSpec, prompt_id: str) -> dict[str, Any] | None:
        """``GET /api/jobs/{id}``: one job with its graph and outputs, or None (not this tenant's)."""
        row = await asyncio.to_thread(self.store.prompt, tenant.id, prompt_id)
        if row is None or row.queue_deleted:
            return None
        (view,) = await self._views([row])
        await self._record_finished([view])
        if view.terminal:
            if row.history_deleted or (view.state == "interrupted" and view.never_started):
                return None
            return protocol.finished_job(history_entry(view), protocol.ms(row.created_at), detail=True)
        return self._queued_job(view, "in_progress" if view.state == "running" else "pending", detail=True)

    async def cancel_job(self, tenant: TenantSpec, prompt_id: str) -> str:
        """Stop a running job, drop a pending one; a finished or unknown one is left alone.
        Returns what it was: ``running``, ``pending``, ``terminal`` or ``unknown``."""
        running, pending = await self.queue(tenant)
        if any(v.row.prompt_id == prompt_id for v in running):
            await self.interrupt(tenant, prompt_id)
            return "running"
        if any(v.row.prompt_id == prompt_id for v in pending):
            await self.delete_from_queue(tenant, [prompt_id])
            return "pending"
        row = await asyncio.to_thread(self.store.prompt, tenant.id, prompt_id)
        return "terminal" if row is not None and not row.queue_deleted else "unknown"

    # -- POST /prompt ---------------------------------------------------------------------------

    async def queue_prompt(self, tenant: TenantSpec, body: Any, trace: RequestTrace) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ComfyError.of(400, "invalid_prompt", "The request body must be a JSON object.")
        number: float = await asyncio.to_thread(self.store.take, tenant.id, "prompt") - 1
        if "number" in body:
            try:
                number = float(body["number"])
            except (TypeError, ValueError, OverflowError):
                raise ComfyError.of(400, "invalid_prompt", "number must be a number", "number") from None
            if not math.isfinite(number):
                raise ComfyError.of(400, "non_finite_number", "number must be a finite number", "number")
        elif body.get("front"):
            number = -number
        if "prompt" not in body:
            raise ComfyError.of(400, "no_prompt", "No prompt provided", "No prompt provided")
        prompt_id = body.get("prompt_id") or str(uuid.uuid4())
        if not isinstance(prompt_id, str) or not _PROMPT_ID.match(prompt_id):
            raise ComfyError.of(
                400, "invalid_prompt_id", "prompt_id must be 1-64 letters, digits, '.', '_', ':' or '-'", "prompt_id"
            )
        extra_data = body.get("extra_data") or {}
        client_id = body.get("client_id")
        if not isinstance(extra_data, dict) or (client_id is not None and not isinstance(client_id, str)):
            raise ComfyError.of(400, "invalid_prompt", "extra_data must be an object and client_id a string")
        extra_data = {**extra_data, **({"client_id": client_id} if client_id is not None else {})}
        graph = body["prompt"]
        self._check_sizes(graph, extra_data)
        digest = content_hash(graph, client_id)
        if "prompt_id" in body:  # a client's own id may be a retry of an accepted prompt
            existing = await asyncio.to_thread(self.store.prompt, tenant.id, prompt_id)
            if existing is not None:
                return self._replay(existing, digest)

        catalog = await catalog_for(self.services, tenant, self.store, graph)
        try:
            compiled = compile_prompt(graph, catalog, self.services.config)
        except PromptRejected as exc:
            raise ComfyError(400, exc.body()) from None
        text = png_text(graph, extra_data)
        for planned in compiled.jobs:
            planned.params.png_text = text
        prepared = await prepare_jobs(self.services, tenant, self.store, compiled, source="comfy", trace=trace)
        accepted = self._drop_rejected(compiled, prepared)
        files, plan = await self._outputs(tenant, compiled, accepted, prompt_id)
        row = ComfyPromptRow(
            tenant_id=tenant.id,
            prompt_id=prompt_id,
            number=number,
            client_id=client_id,
            graph=graph,
            extra_data=extra_data,
            outputs_to_execute=list(compiled.outputs),
            plan=plan,
            job_ids=[job.id for _, job in accepted],
            request_hash=digest,
            created_at=utcnow(),
        )
        try:
            # Written before any job is queued: an accepted prompt always has its row.
            await asyncio.to_thread(self.store.add_prompt, row, files)
        except IntegrityError:
            existing = await asyncio.to_thread(self.store.prompt, tenant.id, prompt_id)
            if existing is None:
                raise
            return self._replay(existing, digest)
        await self._submit(tenant, row, [job for _, job in accepted])
        self.sockets.notify(tenant.id, client_id)
        if self.sockets.of_tenant(tenant.id):  # after the answer: the POST does not wait for it
            self._background(self._broadcast_status(tenant.id))
        return {"prompt_id": prompt_id, "number": protocol.number_of(number), "node_errors": compiled.node_errors}

    def _check_sizes(self, graph: Any, extra_data: dict[str, Any]) -> None:
        """A prompt is stored, listed by /queue and /history and written into its PNGs: its
        graph and extra_data are capped (413, the reason as the error's type)."""
        limits = self.services.config.limits
        try:
            check_stored_size(graph, param="prompt", max_bytes=limits.max_graph_bytes, max_nodes=limits.max_graph_nodes)
            check_stored_size(
                extra_data, param="extra_data", max_bytes=limits.max_extra_data_bytes, code="extra_data_too_large"
            )
        except StoredTooLarge as exc:
            raise ComfyError.from_platform(exc) from None

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _broadcast_status(self, tenant_id: str) -> None:
        """Queue size to the tenant's sockets on this replica (ComfyUI broadcasts it to all)."""
        try:
            await self.sockets.broadcast(tenant_id, protocol.status(await self.remaining(tenant_id)))
        except Exception:  # a status update is advisory: never fail anything over it
            log.warning("comfy status broadcast failed", exc_info=True)

    @staticmethod
    def _replay(existing: ComfyPromptRow, digest: str) -> dict[str, Any]:
        """The same prompt id again: the same graph is the same prompt (a retried POST); another
        graph is refused rather than replacing an accepted prompt."""
        if existing.request_hash != digest:
            raise ComfyError.of(
                400,
                "invalid_prompt_id",
                f"prompt_id {existing.prompt_id} is already used by another prompt",
                "prompt_id",
            )
        return {"prompt_id": existing.prompt_id, "number": protocol.number_of(existing.number), "node_errors": {}}

    @staticmethod
    def _drop_rejected(
        compiled: CompiledPrompt, prepared: list[NewJob | NodeRejected]
    ) -> list[tuple[PlannedJob, NewJob]]:
        """Outputs whose job the platform refuses become node errors; 400 if none is left."""
        accepted = []
        for planned, result in zip(compiled.jobs, prepared, strict=True):
            if isinstance(result, NodeRejected):
                for output in planned.outputs:
                    compiled.graph.add_node_error(result.node, result.comfy_error(), output)
                    compiled.graph.good_outputs.remove(output)
            else:
                accepted.append((planned, result))
        if not accepted:
            raise ComfyError(
                400,
                {
                    "error": comfy_error("prompt_outputs_failed_validation", "Prompt outputs failed validation"),
                    "node_errors": compiled.node_errors,
                },
            )
        return accepted

    async def _outputs(
        self, tenant: TenantSpec, compiled: CompiledPrompt, accepted: list[tuple[PlannedJob, NewJob]], prompt_id: str
    ) -> tuple[list[ComfyFileRow], dict[str, Any]]:
        """Name every output image the way ComfyUI would (``prefix_00001_.png``), and the plan
        the WebSocket relay and /history follow."""
        graph = compiled.graph
        files: list[ComfyFileRow] = []
        jobs = []
        for planned, job in accepted:
            width, height = (int(v) for v in job.params["size"].split("x"))
            outputs: dict[str, list[dict[str, Any]]] = {}
            for node in planned.outputs:
                cls = graph.class_of(node)
                if cls in SAVE_NODES:
                    type_ = "output"
                    subfolder, prefix = format_prefix(str(graph.values[node]["filename_prefix"]), width, height)
                else:
                    type_, subfolder, prefix = "temp", "", _temp_prefix()
                n = len(job.seeds)
                first = await asyncio.to_thread(self.store.take, tenant.id, f"file:{type_}:{subfolder}/{prefix}", n)
                outputs[node] = []
                for index in range(n):
                    name = output_name(cls, prefix, first + index, index)
                    outputs[node].append({"filename": name, "subfolder": subfolder, "type": type_, "index": index})
                    files.append(
                        ComfyFileRow(
                            tenant_id=tenant.id,
                            type=type_,
                            subfolder=subfolder,
                            filename=name,
                            prompt_id=prompt_id,
                            job_id=job.id,
                            image_index=index,
                            width=width,
                            height=height,
                        )
                    )
            jobs.append(
                {
                    "job_id": job.id,
                    "sampler": planned.sampler,
                    "passes": planned.passes,
                    "pre": planned.pre,
                    "between": planned.between,
                    "post": planned.post,
                    "outputs": outputs,
                }
            )
        class_types = {node: graph.class_of(node) for node in compiled.order}
        return files, {"jobs": jobs, "class_types": class_types, "order": compiled.order}

    async def _submit(self, tenant: TenantSpec, row: ComfyPromptRow, jobs: list[NewJob]) -> None:
        """Admit every job of the prompt, or none: a refusal cancels the ones already queued and
        removes the prompt (the client gets the platform's reason, e.g. 429 with Retry-After)."""
        queued: list[str] = []
        try:
            for job in jobs:
                await submit(self.services, tenant, job)
                queued.append(job.id)
        except PlatformError as exc:
            for job_id in queued:
                with contextlib.suppress(PlatformError):
                    await self.services.scheduler.cancel(job_id, tenant.id)
            await asyncio.to_thread(self.store.remove_prompt, tenant.id, row.prompt_id)
            raise ComfyError.from_platform(exc) from None

    # -- queue control --------------------------------------------------------------------------

    async def _cancel(self, tenant: TenantSpec, view: PromptView) -> None:
        for job in view.jobs:
            if job is not None and job.status not in TERMINAL:
                with contextlib.suppress(JobFinished, JobNotFound):
                    await self.services.scheduler.cancel(job.id, tenant.id)

    async def interrupt(self, tenant: TenantSpec, prompt_id: str | None) -> None:
        """Stop the tenant's running prompts (or only ``prompt_id``, if it is running) at the
        next sampler step; a prompt that is not running is left alone, as in ComfyUI."""
        running, _ = await self.queue(tenant)
        for view in running:
            if prompt_id is None or view.row.prompt_id == prompt_id:
                await self._cancel(tenant, view)

    async def delete_from_queue(self, tenant: TenantSpec, prompt_ids: list[str] | None) -> None:
        """Remove pending prompts (all of them for ``None``); running ones are not touched. A
        removed prompt never runs and never appears in history."""
        _, pending = await self.queue(tenant)
        chosen = [v for v in pending if prompt_ids is None or v.row.prompt_id in prompt_ids]
        for view in chosen:
            await self._cancel(tenant, view)
        removed = [v.row.prompt_id for v in await self._views([v.row for v in chosen]) if v.never_started]
        if removed:
            await asyncio.to_thread(self.store.mark, tenant.id, removed, queue_deleted=True)
        if chosen:
            await self._broadcast_status(tenant.id)

    async def delete_history(self, tenant: TenantSpec, prompt_ids: list[str] | None) -> None:
        await asyncio.to_thread(self.store.mark, tenant.id, prompt_ids, history_deleted=True)

    # -- files ----------------------------------------------------------------------------------

    async def upload(
        self, tenant: TenantSpec, data: bytes, filename: str, type_: str, subfolder: str, overwrite: bool
    ) -> dict[str, str]:
        if type_ not in _FOLDERS:
            raise ComfyError.of(
                400, "invalid_type", f"type must be one of {list(_FOLDERS)}", "type", choices=list(_FOLDERS)
            )
        _check_name(filename, "filename")
        subfolder = subfolder.strip("/")
        if subfolder:
            _check_path(subfolder)
        try:
            image = await asyncio.to_thread(decode_image, data, image_limits(self.services), param="image")
        except PlatformError as exc:
            status = 413 if exc.code == "image_too_large" else 400
            raise ComfyError(status, ComfyError.from_platform(exc).body) from None
        content_type = sniff_media_type(data)  # what Pillow read it as, never the file name's guess
        if content_type is None:
            raise ComfyError.of(400, "image_format_unsupported", "the upload is not a PNG, JPEG or WebP image", "image")
        digest = sha256_hex(data)
        key = f"tenants/{tenant.id}/comfy/{type_}/{digest}"
        await asyncio.to_thread(self.services.results.put_bytes, key, data, content_type, {"tenant-id": tenant.id})
        upload = Upload(type_, subfolder, filename, key, digest, *image.size)
        name = await asyncio.to_thread(self.store.save_upload, tenant.id, upload, overwrite=overwrite)
        return protocol.upload_result(name, subfolder, type_)

    async def view(self, tenant: TenantSpec, filename: str, subfolder: str, type_: str) -> tuple[bytes, str] | None:
        """A file's bytes from S3 and its name, or None when this tenant has no such file."""
        file_type, sub, name = split_image_name(filename)
        if file_type != "input" or filename.endswith(" [input]"):
            type_ = file_type
        if sub:
            subfolder = f"{subfolder}/{sub}" if subfolder else sub
        row = await asyncio.to_thread(self.store.file, tenant.id, type_, subfolder.strip("/"), name)
        if row is None:
            return None
        key = row.s3_key
        if key is None and row.job_id is not None:
            jobs = await asyncio.to_thread(self.store.jobs, [row.job_id])
            job = jobs.get(row.job_id)
            image = next((i for i in job.images if i.index == row.image_index), None) if job else None
            key = image.s3_key if image is not None and image.status == "done" else None
        if key is None:
            return None
        return await asyncio.to_thread(self.services.results.get_bytes, key), name

    # -- descriptions ---------------------------------------------------------------------------

    async def object_info(self, tenant: TenantSpec, node_class: str | None = None) -> dict[str, Any]:
        return object_info(await catalog_for(self.services, tenant, self.store), node_class)

    async def models(self, tenant: TenantSpec, folder: str) -> list[str] | None:
        if folder not in MODEL_FOLDERS:
            return None
        return (await catalog_for(self.services, tenant, self.store)).lists[folder]

    def features(self) -> dict[str, Any]:
        # Previews are never streamed as binary frames: generation happens on engine replicas.
        return {
            "supports_preview_metadata": False,
            "max_upload_size": self.services.config.limits.max_input_image_bytes,
        }

    def system_stats(self) -> dict[str, Any]:
        """Reads /proc and packages' metadata on disk: call it from a worker thread."""
        memory = psutil.virtual_memory()
        config = self.services.config
        torch_version = package_version("torch")
        frontend_version = package_version("comfyui-frontend-package")
        templates_version = package_version("comfyui-workflow-templates-json")
        devices = []
        for name, pool in config.pools.items():
            total = int((pool.slice_gb or 0) * 2**30)
            devices.append(
                {
                    "name": f"{name} ({pool.mig_profile or 'cpu'})",
                    "type": "cuda" if pool.num_gpus > 0 else "cpu",
                    "index": None,
                    "vram_total": total,
                    "vram_free": total,
                    "torch_vram_total": total,
                    "torch_vram_free": total,
                }
            )
        return {
            "system": {
                "os": "posix" if sys.platform != "win32" else "nt",
                "ram_total": memory.total,
                "ram_free": memory.available,
                "comfyui_version": protocol.COMFYUI_API_VERSION,
                # The frontend and the templates this platform serves (None: not installed).
                "required_frontend_version": frontend_version,
                "comfyui_frontend_version": frontend_version,
                "installed_templates_version": templates_version,
                "required_templates_version": templates_version,
                "zimage_platform_version": __version__,
                "python_version": sys.version,
                "pytorch_version": torch_version,
                "embedded_python": False,
                "platform": platform.platform(),
                "argv": [],
            },
            "devices": devices,
        }

    # -- the WebSocket --------------------------------------------------------------------------

    async def serve_socket(
        self, websocket: WebSocket, tenant: TenantSpec, client_id: str | None, stream: Stream | None = None
    ) -> None:
        """``stream``: the socket's slot, whose caller is re-checked before each message and
        between messages; the socket closes (1008, with the reason) once access is gone."""
        await websocket.accept()
        conn = Connection(websocket, tenant.id, client_id or uuid.uuid4().hex, utcnow(), stream=stream)
        previous = self.sockets.register(conn)
        if previous is not None:
            await previous.close()
        try:
            await conn.send(protocol.status(await self.remaining(tenant), conn.sid))
            if stream is not None:
                conn.spawn(stream.watch(conn.lost))
            conn.spawn(self._watch(conn))
            first = True
            while True:
                text = await websocket.receive_text()
                try:
                    message = json.loads(text)
                except ValueError:  # ComfyUI ignores what it cannot parse; so do we
                    message = None
                if first and isinstance(message, dict) and message.get("type") == "feature_flags":
                    await conn.send(protocol.message("feature_flags", self.features()))
                first = False
        except (WebSocketDisconnect, RuntimeError, KeyError):
            pass
        finally:
            self.sockets.unregister(conn)
            await conn.close()

    async def _watch(self, conn: Connection) -> None:
        """Relay every prompt this client submits (here, or on another replica: found by polling)."""
        while True:
            conn.wake.clear()
            try:
                rows = await asyncio.to_thread(self.store.of_client, conn.tenant_id, conn.sid, conn.connected_at)
            except Exception:  # the database blinked: look again next round
                log.warning("comfy socket poll failed", exc_info=True)
                rows = []
            for row in rows:
                if row.prompt_id not in conn.relayed:
                    conn.relayed.add(row.prompt_id)
                    conn.active_at = utcnow()
                    conn.spawn(self._relay(conn, row))
            quiet = utcnow() - conn.active_at > IDLE_AFTER
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_POLL_S if quiet else POLL_S):
                    await conn.wake.wait()

    async def _relay(self, conn: Connection, row: ComfyPromptRow) -> None:
        if row.created_at < conn.connected_at:  # from before this socket: replay only if unfinished
            (view,) = await self._views([row])
            if view.terminal and view.finished_at is not None and view.finished_at < conn.connected_at:
                await self._record_finished([view])
                return
        relay = PromptRelay(row.prompt_id, row.plan)
        events: asyncio.Queue[tuple[int, dict[str, Any] | None]] = asyncio.Queue()
        streams = [asyncio.create_task(self._forward(i, job_id, events)) for i, job_id in enumerate(row.job_ids)]
        ends: dict[int, dict[str, Any]] = {}
        started = False
        try:
            await conn.send(protocol.status(await self.remaining(conn.tenant_id)))
            open_streams = len(streams)
            while open_streams:
                index, event = await events.get()
                if event is None:
                    open_streams -= 1
                    continue
                started = started or event.get("type") in ("started", "progress")
                if event.get("type") in ("succeeded", "failed", "cancelled"):
                    ends[index] = event
                await conn.send_all(relay.on_event(index, event))
        finally:
            for task in streams:
                task.cancel()
        if len(ends) == len(row.job_ids):  # every job told how it ended: no need to ask the database
            view = view_from_events(row, ends, started)
        else:
            while True:  # a stream broke off (a scheduler restart): the jobs' rows will finish
                current = await asyncio.to_thread(self.store.prompt, row.tenant_id, row.prompt_id)
                if current is None:  # its submission was refused: the client got that answer to its POST
                    return
                (view,) = await self._views([current])
                if view.terminal:
                    break
                await asyncio.sleep(0.5)
        stopped_at = relay.current_node(view.culprit) if view.culprit is not None else None
        terminal = terminal_message(view, stopped_at)
        # remaining() also records this prompt as finished (its jobs' rows are terminal by now).
        await conn.send_all(relay.finish(terminal, await self.remaining(conn.tenant_id)))

    async def _forward(self, index: int, job_id: str, events: asyncio.Queue) -> None:
        """One job's events into the prompt's queue; ``None`` when its stream ends."""
        deadline = asyncio.get_running_loop().time() + SUBMIT_GRACE.total_seconds()
        try:
            while True:
                try:
                    async for event in self.services.scheduler.events(job_id):
                        await events.put((index, event))
                    return
                except JobNotFound:
                    # Found through the database while its POST is still queueing the jobs.
                    if asyncio.get_running_loop().time() > deadline:
                        return
                    await asyncio.sleep(0.1)
                except PlatformError as exc:
                    if exc.code != "job_not_found" or asyncio.get_running_loop().time() > deadline:
                        return
                    await asyncio.sleep(0.1)
        except Exception:  # the stream broke: the relay falls back to the job rows
            log.warning("event stream of job %s ended with an error", job_id, exc_info=True)
        finally:
            await events.put((index, None))


def _check_name(name: str, what: str) -> None:
    if not name or "/" in name or "\\" in name or name in (".", "..") or len(name) > 255:
        raise ComfyError.of(400, "invalid_filename", f"{what} must be a plain file name (no '/', at most 255)", what)


def _check_path(subfolder: str) -> None:
    parts = subfolder.replace("\\", "/").split("/")
    if subfolder.startswith("/") or ".." in parts or len(subfolder) > 200:
        raise ComfyError.of(400, "invalid_subfolder", "subfolder must stay inside the folder (no '..')", "subfolder")


def convert_view(data: bytes, preview: str | None, channel: str | None) -> tuple[bytes, str]:
    """``/view``'s ``preview=webp;90`` and ``channel=rgb|a`` conversions (as ComfyUI). Only
    images are served, as their bytes' type: anything else (a file stored before uploads were
    checked) is refused rather than sent as whatever its name says (HTML, SVG...)."""
    media_type = sniff_media_type(data)
    if media_type is None:
        raise ComfyError.of(415, "not_an_image", "the file is not a PNG, JPEG or WebP image", "filename")
    if preview is None and channel in (None, "rgba"):
        return data, media_type
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        out = io.BytesIO()
        if preview is not None:
            fmt, *rest = preview.split(";")
            fmt = fmt if fmt in ("webp", "jpeg") and "a" not in (channel or "") else "webp"
            quality = int(rest[-1]) if rest and rest[-1].isdigit() else 90
            image = img.convert("RGB") if fmt == "jpeg" or channel == "rgb" else img
            image.save(out, format=fmt, quality=quality)
            return out.getvalue(), f"image/{fmt}"
        if channel == "a":
            alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
            result = Image.new("RGBA", img.size)
            result.putalpha(alpha)
        else:
            result = img.convert("RGB")
        result.save(out, format="PNG")
        return out.getvalue(), "image/png"
