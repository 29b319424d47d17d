"""Persistence: one SQLAlchemy base, engines for SQLite and PostgreSQL, Alembic migrations."""

from zimage_platform.db.base import Base, UTCDateTime, utcnow
from zimage_platform.db.engine import create_db_engine, session_factory
from zimage_platform.db.migrate import upgrade

__all__ = ["Base", "UTCDateTime", "create_db_engine", "session_factory", "upgrade", "utcnow"]
