"""Durable state of workflows: saved workflows, and ComfyUI prompts, files and counters.

ComfyUI keeps its queue and history in one process's memory. Here a prompt is a row that
points at platform jobs (the jobs are the truth about progress and results), so history
survives restarts and every ingress replica answers the same. Only live WebSocket
connections are held in memory.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from zimage_platform.db.base import Base, UTCDateTime, utcnow


class WorkflowRow(Base):
    """One version of a tenant's saved workflow (a new PUT adds a version; old ones stay)."""

    __tablename__ = "workflows"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", "version", name="uq_workflows_tenant_name_version"),
        Index("ix_workflows_tenant_name", "tenant_id", "name"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    #: The API-format graph (node id → {class_type, inputs}).
    graph: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: Parameter name → where its value goes in the graph (see api/workflows/protocol.py).
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    description: Mapped[str | None] = mapped_column(Text)
    #: sha256 of graph + parameters + description: a PUT of the same content adds no version.
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ComfyPromptRow(Base):
    """A ComfyUI prompt: the graph as sent, and the platform jobs it was compiled into."""

    __tablename__ = "comfy_prompts"
    __table_args__ = (
        Index("ix_comfy_prompts_tenant_client", "tenant_id", "client_id", "created_at"),
        Index("ix_comfy_prompts_tenant_finished", "tenant_id", "finished_at"),
    )

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Chosen by the client or minted here; scoped per tenant (another tenant's ids are unknown).
    prompt_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: ComfyUI's queue number (negative when sent with ``front``; a float when the client set it).
    number: Mapped[float] = mapped_column(Float)
    client_id: Mapped[str | None] = mapped_column(String(128))
    graph: Mapped[dict[str, Any]] = mapped_column(JSON)
    extra_data: Mapped[dict[str, Any]] = mapped_column(JSON)
    outputs_to_execute: Mapped[list[str]] = mapped_column(JSON)
    #: What the WebSocket and /history need: jobs, the nodes each stands for, output file names.
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    job_ids: Mapped[list[str]] = mapped_column(JSON)
    request_hash: Mapped[str] = mapped_column(String(64))
    #: Set once all jobs are terminal: success | error | interrupted (from the jobs, never guessed).
    state: Mapped[str | None] = mapped_column(String(16))
    #: Removed from the queue (``POST /queue {delete|clear}``) before it ran: never in history.
    queue_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Removed from history (``POST /history {delete|clear}``); its jobs and images stay.
    history_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ComfyFileRow(Base):
    """A file name a ComfyUI client can ``/view``: an upload, or one image of a prompt's job."""

    __tablename__ = "comfy_files"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: input | output | temp (ComfyUI's folders).
    type: Mapped[str] = mapped_column(String(8), primary_key=True)
    subfolder: Mapped[str] = mapped_column(String(255), primary_key=True)
    filename: Mapped[str] = mapped_column(String(255), primary_key=True)
    prompt_id: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(40))
    image_index: Mapped[int | None] = mapped_column(Integer)
    #: Uploads: where the bytes are (content-addressed); images of jobs: see the job's image row.
    s3_key: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ComfyCounterRow(Base):
    """Per-tenant counters: the prompt ``number`` and the ``_00001_`` of each file prefix."""

    __tablename__ = "comfy_counters"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(512), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
