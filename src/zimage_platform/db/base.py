"""Declarative base shared by every table (jobs, tenancy, billing), with stable constraint names."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, MetaData, TypeDecorator
from sqlalchemy.orm import DeclarativeBase

# Named constraints make Alembic migrations identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UInt64(TypeDecorator):
    """Unsigned 64-bit integers (ComfyUI's seeds, 0 … 2**64 − 1) in a signed BIGINT column, exactly:
    values from 2**63 up are stored as their two's-complement negative and mapped back on read.
    No migration is needed and SQLite and PostgreSQL hold them the same way; a raw SQL reader
    sees the signed value (``value + 2**64`` when negative)."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect) -> int | None:
        if value is None:
            return None
        if not 0 <= value < 2**64:
            raise ValueError(f"{value} is not an unsigned 64-bit integer")
        return value - 2**64 if value >= 2**63 else value

    def process_result_value(self, value: int | None, dialect) -> int | None:
        if value is None:
            return None
        return value + 2**64 if value < 0 else value


def utcnow() -> datetime:
    return datetime.now(UTC)
