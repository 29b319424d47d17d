"""Browser sessions: a random token in an HttpOnly cookie, only its SHA-256 in the database.

The row names the tenant and the *id* of the API key the person logged in with (never the key
itself), so every request re-checks that key against the tenant registry: revoking the key or
suspending the tenant ends its sessions at once, on every replica. A leaked database holds no
usable cookie.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import Engine, Index, String, delete, select
from sqlalchemy.orm import Mapped, mapped_column

from zimage_platform.db import session_factory, utcnow
from zimage_platform.db.base import Base, UTCDateTime


class BrowserSessionRow(Base):
    __tablename__ = "browser_sessions"
    __table_args__ = (Index("ix_browser_sessions_expires", "expires_at"),)

    #: SHA-256 (hex) of the cookie's token.
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)

    def create(self, tenant_id: str, key_id: str, ttl: timedelta) -> tuple[str, BrowserSessionRow]:
        """A new session; returns the token for the cookie (shown once, stored only hashed).
        Expired sessions are swept here, so the table stays as small as the live ones."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        row = BrowserSessionRow(
            token_hash=token_hash(token), tenant_id=tenant_id, key_id=key_id, created_at=now, expires_at=now + ttl
        )
        with self._sessions() as s, s.begin():
            s.execute(delete(BrowserSessionRow).where(BrowserSessionRow.expires_at <= now))
            s.add(row)
        return token, row

    def get(self, token: str) -> BrowserSessionRow | None:
        """The live session of a cookie token, or None (unknown, ended or expired)."""
        with self._sessions() as s:
            row = s.scalars(select(BrowserSessionRow).where(BrowserSessionRow.token_hash == token_hash(token))).first()
        if row is None or row.expires_at <= utcnow():
            return None
        return row

    def end(self, token: str) -> bool:
        with self._sessions() as s, s.begin():
            gone = s.execute(delete(BrowserSessionRow).where(BrowserSessionRow.token_hash == token_hash(token)))
        return bool(gone.rowcount)

    def end_key(self, key_id: str) -> int:
        """End every session opened with this key (its key was revoked)."""
        with self._sessions() as s, s.begin():
            return s.execute(delete(BrowserSessionRow).where(BrowserSessionRow.key_id == key_id)).rowcount
