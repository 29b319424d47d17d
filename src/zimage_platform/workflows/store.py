"""Reads and writes of workflow state, every query scoped to one tenant.

Counters are one atomic ``UPDATE ... RETURNING`` (SQLite and PostgreSQL alike), so replicas
never hand out the same prompt number or file name.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, Text, cast, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer

from zimage_platform.db import session_factory, utcnow
from zimage_platform.scheduling.models import JobRow
from zimage_platform.workflows.models import ComfyCounterRow, ComfyFileRow, ComfyPromptRow, WorkflowRow

#: ComfyUI keeps at most this many prompts in its history; so do we (per tenant, per request).
MAX_HISTORY = 10_000


def _light(q: Select) -> Select:
    """Prompt rows without their graph and extra_data (up to megabytes each): what queue state,
    counts and relays need. Reading either from such a row raises instead of querying again."""
    return q.options(defer(ComfyPromptRow.graph, raiseload=True), defer(ComfyPromptRow.extra_data, raiseload=True))


def content_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@dataclass
class Upload:
    type: str
    subfolder: str
    filename: str
    s3_key: str
    sha256: str
    width: int
    height: int


class ComfyStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = session_factory(engine)

    # -- counters ---------------------------------------------------------------------------

    def take(self, tenant_id: str, name: str, count: int = 1) -> int:
        """Reserve ``count`` consecutive values of a counter; returns the first (counters start at 1)."""
        for _ in range(5):
            with self._sessions() as s, s.begin():
                new = s.execute(
                    update(ComfyCounterRow)
                    .where(ComfyCounterRow.tenant_id == tenant_id, ComfyCounterRow.name == name)
                    .values(value=ComfyCounterRow.value + count)
                    .returning(ComfyCounterRow.value)
                ).scalar()
            if new is not None:
                return int(new) - count + 1
            try:
                with self._sessions() as s, s.begin():
                    s.add(ComfyCounterRow(tenant_id=tenant_id, name=name, value=count))
                return 1
            except IntegrityError:  # another replica created it first: take from it
                continue
        raise RuntimeError(f"counter {name} of {tenant_id} could not be advanced")

    # -- prompts ----------------------------------------------------------------------------

    def add_prompt(self, prompt: ComfyPromptRow, files: Sequence[ComfyFileRow]) -> None:
        """The prompt and its output file names in one transaction (IntegrityError: id taken)."""
        with self._sessions() as s, s.begin():
            s.add(prompt)
            s.flush()
            s.add_all(files)

    def remove_prompt(self, tenant_id: str, prompt_id: str) -> None:
        """Undo :meth:`add_prompt` for a prompt whose jobs were refused (nothing was accepted)."""
        with self._sessions() as s, s.begin():
            s.execute(
                delete(ComfyFileRow).where(ComfyFileRow.tenant_id == tenant_id, ComfyFileRow.prompt_id == prompt_id)
            )
            s.execute(
                delete(ComfyPromptRow).where(
                    ComfyPromptRow.tenant_id == tenant_id, ComfyPromptRow.prompt_id == prompt_id
                )
            )

    def prompt(self, tenant_id: str, prompt_id: str) -> ComfyPromptRow | None:
        with self._sessions() as s:
            return s.get(ComfyPromptRow, (tenant_id, prompt_id))

    def prompts(self, tenant_id: str, prompt_ids: Iterable[str]) -> list[ComfyPromptRow]:
        ids = list(prompt_ids)
        if not ids:
            return []
        with self._sessions() as s:
            q = select(ComfyPromptRow).where(ComfyPromptRow.tenant_id == tenant_id, ComfyPromptRow.prompt_id.in_(ids))
            return list(s.scalars(q))

    def body_sizes(self, tenant_id: str, prompt_ids: Iterable[str]) -> dict[str, int]:
        """Size of each prompt's stored graph + extra_data (characters of the JSON text the
        database holds), so a listing can stay within its budget before it reads them."""
        ids = list(prompt_ids)
        if not ids:
            return {}
        size = func.length(cast(ComfyPromptRow.graph, Text)) + func.length(cast(ComfyPromptRow.extra_data, Text))
        with self._sessions() as s:
            q = select(ComfyPromptRow.prompt_id, size).where(
                ComfyPromptRow.tenant_id == tenant_id, ComfyPromptRow.prompt_id.in_(ids)
            )
            return {prompt_id: int(n or 0) for prompt_id, n in s.execute(q)}

    def workflow_ids(self, tenant_id: str, prompt_ids: Iterable[str]) -> dict[str, str | None]:
        """``extra_data.extra_pnginfo.workflow.id`` of each prompt (the jobs list shows only that)."""
        ids = list(prompt_ids)
        if not ids:
            return {}
        workflow = ComfyPromptRow.extra_data[("extra_pnginfo", "workflow", "id")].as_string()
        with self._sessions() as s:
            q = select(ComfyPromptRow.prompt_id, workflow).where(
                ComfyPromptRow.tenant_id == tenant_id, ComfyPromptRow.prompt_id.in_(ids)
            )
            return {prompt_id: workflow_id for prompt_id, workflow_id in s.execute(q)}

    def unfinished(self, tenant_id: str) -> list[ComfyPromptRow]:
        """Prompts not yet known to be finished (queued, running, or finished unobserved);
        without their bodies (see :func:`_light`)."""
        with self._sessions() as s:
            q = select(ComfyPromptRow).where(
                ComfyPromptRow.tenant_id == tenant_id,
                ComfyPromptRow.finished_at.is_(None),
                ComfyPromptRow.queue_deleted.is_(False),
            )
            return list(s.scalars(_light(q).order_by(ComfyPromptRow.number, ComfyPromptRow.created_at)))

    def of_client(self, tenant_id: str, client_id: str, since: datetime) -> list[ComfyPromptRow]:
        """A WebSocket's candidates: its client's prompts unfinished or created since ``since``
        (without their bodies)."""
        with self._sessions() as s:
            q = select(ComfyPromptRow).where(
                ComfyPromptRow.tenant_id == tenant_id,
                ComfyPromptRow.client_id == client_id,
                (ComfyPromptRow.finished_at.is_(None)) | (ComfyPromptRow.created_at >= since),
            )
            return list(s.scalars(_light(q).order_by(ComfyPromptRow.created_at)))

    def history(self, tenant_id: str, *, max_items: int | None, offset: int | None) -> list[ComfyPromptRow]:
        """Finished prompts oldest first, without their bodies; ``max_items`` alone means "the
        last N" (as ComfyUI)."""
        with self._sessions() as s:
            base = select(ComfyPromptRow).where(
                ComfyPromptRow.tenant_id == tenant_id,
                ComfyPromptRow.finished_at.is_not(None),
                ComfyPromptRow.queue_deleted.is_(False),
                ComfyPromptRow.history_deleted.is_(False),
            )
            limit = min(max_items if max_items is not None else MAX_HISTORY, MAX_HISTORY)
            if offset is None or offset < 0:
                total = s.scalar(select(func.count()).select_from(base.subquery())) or 0
                offset = max(0, total - limit)
            q = base.order_by(ComfyPromptRow.finished_at, ComfyPromptRow.number).offset(offset).limit(limit)
            return list(s.scalars(_light(q)))

    def history_count(self, tenant_id: str) -> int:
        with self._sessions() as s:
            return (
                s.scalar(
                    select(func.count()).where(
                        ComfyPromptRow.tenant_id == tenant_id,
                        ComfyPromptRow.finished_at.is_not(None),
                        ComfyPromptRow.queue_deleted.is_(False),
                        ComfyPromptRow.history_deleted.is_(False),
                    )
                )
                or 0
            )

    def finish(self, tenant_id: str, prompt_id: str, state: str, finished_at: datetime) -> None:
        """Record a prompt's terminal state (once: the first observer's view stands)."""
        with self._sessions() as s, s.begin():
            s.execute(
                update(ComfyPromptRow)
                .where(
                    ComfyPromptRow.tenant_id == tenant_id,
                    ComfyPromptRow.prompt_id == prompt_id,
                    ComfyPromptRow.finished_at.is_(None),
                )
                .values(state=state, finished_at=finished_at)
            )

    def mark(self, tenant_id: str, prompt_ids: Iterable[str] | None, **flags: bool) -> None:
        """Set ``queue_deleted`` / ``history_deleted`` on some (``None``: all) of a tenant's prompts."""
        with self._sessions() as s, s.begin():
            q = update(ComfyPromptRow).where(ComfyPromptRow.tenant_id == tenant_id)
            if prompt_ids is not None:
                q = q.where(ComfyPromptRow.prompt_id.in_(list(prompt_ids)))
            s.execute(q.values(**flags))

    def jobs(self, job_ids: Iterable[str]) -> dict[str, JobRow]:
        """The platform jobs behind prompts (their images included), by id."""
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return {}
        with self._sessions() as s:
            return {row.id: row for row in s.scalars(select(JobRow).where(JobRow.id.in_(ids)))}

    # -- files ------------------------------------------------------------------------------

    def file(self, tenant_id: str, type_: str, subfolder: str, filename: str) -> ComfyFileRow | None:
        with self._sessions() as s:
            return s.get(ComfyFileRow, (tenant_id, type_, subfolder, filename))

    def input_images(self, tenant_id: str) -> dict[str, tuple[int, int]]:
        """Uploaded images as LoadImage names them (``sub/name.png``) → (width, height)."""
        with self._sessions() as s:
            q = select(ComfyFileRow).where(
                ComfyFileRow.tenant_id == tenant_id, ComfyFileRow.type == "input", ComfyFileRow.s3_key.is_not(None)
            )
            return {
                (f"{row.subfolder}/{row.filename}" if row.subfolder else row.filename): (
                    row.width or 0,
                    row.height or 0,
                )
                for row in s.scalars(q)
            }

    def save_upload(self, tenant_id: str, upload: Upload, *, overwrite: bool) -> str:
        """Store an upload under its name; without ``overwrite`` a different file of that name
        makes it ``name (1).png`` (same bytes: the existing name). Returns the name used."""
        stem, dot, ext = upload.filename.rpartition(".")
        stem, ext = (stem, f".{ext}") if dot and stem else (upload.filename, "")
        name, i = upload.filename, 1
        while True:
            try:
                with self._sessions() as s, s.begin():
                    key = (tenant_id, upload.type, upload.subfolder, name)
                    existing = s.get(ComfyFileRow, key, with_for_update=True)
                    if existing is None:
                        s.add(
                            ComfyFileRow(
                                tenant_id=tenant_id,
                                type=upload.type,
                                subfolder=upload.subfolder,
                                filename=name,
                                s3_key=upload.s3_key,
                                sha256=upload.sha256,
                                width=upload.width,
                                height=upload.height,
                            )
                        )
                        return name
                    if overwrite and existing.s3_key is not None:
                        existing.s3_key, existing.sha256 = upload.s3_key, upload.sha256
                        existing.width, existing.height = upload.width, upload.height
                        existing.created_at = utcnow()
                        return name
                    if existing.sha256 == upload.sha256:
                        return name
            except IntegrityError:  # the name was taken meanwhile: look again
                continue
            name, i = f"{stem} ({i}){ext}", i + 1


class WorkflowNotFound(LookupError):
    pass


class WorkflowStore:
    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)

    def put(
        self, tenant_id: str, name: str, graph: dict, parameters: dict, description: str | None
    ) -> tuple[WorkflowRow, bool]:
        """A new version, unless the latest has the same content. ``(row, created)``."""
        digest = content_hash(graph, parameters, description)
        for _ in range(5):
            latest = self.get(tenant_id, name, missing_ok=True)
            if latest is not None and latest.content_hash == digest:
                return latest, False
            row = WorkflowRow(
                id=f"wf_{uuid.uuid4().hex}",
                tenant_id=tenant_id,
                name=name,
                version=(latest.version + 1) if latest else 1,
                graph=graph,
                parameters=parameters,
                description=description,
                content_hash=digest,
                created_at=utcnow(),
            )
            try:
                with self._sessions() as s, s.begin():
                    s.add(row)
                return row, True
            except IntegrityError:  # a concurrent PUT took this version number
                continue
        raise RuntimeError(f"workflow {name} could not be versioned")

    def get(
        self, tenant_id: str, name: str, version: int | None = None, *, missing_ok: bool = False
    ) -> WorkflowRow | None:
        with self._sessions() as s:
            q = select(WorkflowRow).where(WorkflowRow.tenant_id == tenant_id, WorkflowRow.name == name)
            q = q.where(WorkflowRow.version == version) if version is not None else q
            row = s.scalars(q.order_by(WorkflowRow.version.desc()).limit(1)).first()
        if row is None and not missing_ok:
            raise WorkflowNotFound(name)
        return row

    def latest(self, tenant_id: str) -> list[WorkflowRow]:
        """The newest version of each of a tenant's workflows, by name."""
        with self._sessions() as s:
            newest = (
                select(WorkflowRow.name, func.max(WorkflowRow.version).label("version"))
                .where(WorkflowRow.tenant_id == tenant_id)
                .group_by(WorkflowRow.name)
                .subquery()
            )
            q = (
                select(WorkflowRow)
                .join(newest, (WorkflowRow.name == newest.c.name) & (WorkflowRow.version == newest.c.version))
                .where(WorkflowRow.tenant_id == tenant_id)
                .order_by(WorkflowRow.name)
            )
            return list(s.scalars(q))

    def versions(self, tenant_id: str, name: str) -> list[int]:
        with self._sessions() as s:
            q = select(WorkflowRow.version).where(WorkflowRow.tenant_id == tenant_id, WorkflowRow.name == name)
            return list(s.scalars(q.order_by(WorkflowRow.version)))

    def delete(self, tenant_id: str, name: str) -> int:
        """Delete every version; returns how many there were."""
        with self._sessions() as s, s.begin():
            result = s.execute(delete(WorkflowRow).where(WorkflowRow.tenant_id == tenant_id, WorkflowRow.name == name))
        return result.rowcount or 0
