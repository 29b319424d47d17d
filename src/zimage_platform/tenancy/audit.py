"""The append-only audit log: who did what to which tenant, when (admin actions, policy hits).

Rows are hash-chained (see :mod:`zimage_platform.db.chain`): the platform only ever inserts,
and ``verify()`` proves nothing was changed or removed afterwards (the last rows included:
the chain's end must match its head).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Engine, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from zimage_platform.db import Base, UTCDateTime, session_factory, utcnow
from zimage_platform.db.chain import GENESIS, append, head, head_mismatch, link_hash

CHAIN = "audit"


class AuditEventRow(Base):
    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    tenant_id: Mapped[str | None] = mapped_column(String(64), index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    def content(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "tenant_id": self.tenant_id,
            "details": self.details,
        }


class AuditLog:
    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)

    def record(self, action: str, *, actor: str, tenant_id: str | None = None, **details: Any) -> AuditEventRow:
        row = AuditEventRow(at=utcnow(), actor=actor, action=action, tenant_id=tenant_id, details=details)
        with self._sessions() as s, s.begin():
            row.seq, row.prev_hash, row.hash = append(s, CHAIN, row.content())
            s.add(row)
        return row

    def events(self, *, tenant_id: str | None = None, action: str | None = None, limit: int = 1000):
        with self._sessions() as s:
            q = select(AuditEventRow)
            if tenant_id:
                q = q.where(AuditEventRow.tenant_id == tenant_id)
            if action:
                q = q.where(AuditEventRow.action == action)
            return list(s.scalars(q.order_by(AuditEventRow.seq.desc()).limit(limit)))

    def verify(self) -> list[str]:
        """Every break in the chain, as readable findings (empty: intact)."""
        findings: list[str] = []
        prev = GENESIS
        expected_seq = 1
        with self._sessions() as s:
            for row in s.scalars(select(AuditEventRow).order_by(AuditEventRow.seq)):
                if row.seq != expected_seq:
                    findings.append(f"row {expected_seq} is missing (next is {row.seq})")
                if row.prev_hash != prev:
                    findings.append(f"row {row.seq}: prev_hash does not follow row {row.seq - 1}")
                if link_hash(row.prev_hash, row.content()) != row.hash:
                    findings.append(f"row {row.seq}: content does not match its hash (altered)")
                prev, expected_seq = row.hash, row.seq + 1
            mismatch = head_mismatch(expected_seq - 1, prev, head(s, CHAIN))
        if mismatch is not None:
            findings.append(f"{mismatch[1]} ({mismatch[0]})")
        return findings
