"""Hash chains for tamper-evident, append-only tables (admin audit log, billing ledger).

Each chain (``audit``, ``ledger:<tenant>``) has a head row holding its last sequence number
and hash. Appending locks the head (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite serialises
writers anyway), so concurrent writers on several replicas still produce one unbroken chain.
A row's hash covers its canonical content and the previous row's hash: changing, removing or
reordering any row breaks every hash after it. Removing the *last* rows breaks no hash, so a
verifier also compares the chain's end with its head (:func:`head_mismatch`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import Integer, String, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from zimage_platform.db.base import Base

GENESIS = "0" * 64


class ChainHeadRow(Base):
    __tablename__ = "chain_heads"

    chain: Mapped[str] = mapped_column(String(96), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    hash: Mapped[str] = mapped_column(String(64), default=GENESIS)


def canonical(content: dict[str, Any]) -> bytes:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False).encode()


def link_hash(prev_hash: str, content: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical(content)).hexdigest()


Content = dict[str, Any] | Callable[[int], dict[str, Any]]


def append(session: Session, chain: str, content: Content) -> tuple[int, str, str]:
    """Reserve the next link of ``chain`` inside the caller's transaction: ``(seq, prev_hash, hash)``.

    ``content`` may be a function of the new sequence number, for rows that hash their own
    position: it is called only once the head is locked, so the number cannot change under it.
    """
    return append_many(session, chain, [content])[0]


def append_many(session: Session, chain: str, contents: list[Content]) -> list[tuple[int, str, str]]:
    """:func:`append` for several rows in order, locking the head once."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(ChainHeadRow).values(chain=chain, seq=0, hash=GENESIS).on_conflict_do_nothing())
    head = session.scalars(select(ChainHeadRow).where(ChainHeadRow.chain == chain).with_for_update()).one()
    links = []
    for content in contents:
        prev, seq = head.hash, head.seq + 1
        head.seq, head.hash = seq, link_hash(prev, content(seq) if callable(content) else content)
        links.append((seq, prev, head.hash))
    return links


def heads(session: Session, prefix: str) -> dict[str, tuple[int, str]]:
    """``chain → (seq, hash)`` of every chain whose name starts with ``prefix``."""
    rows = session.execute(select(ChainHeadRow).where(ChainHeadRow.chain.startswith(prefix, autoescape=True)))
    return {head.chain: (head.seq, head.hash) for (head,) in rows}


def head(session: Session, chain: str) -> tuple[int, str] | None:
    """``(seq, hash)`` of one chain's head (``None``: nothing was ever appended)."""
    row = session.get(ChainHeadRow, chain)
    return (row.seq, row.hash) if row is not None else None


def head_mismatch(last_seq: int, last_hash: str, head: tuple[int, str] | None) -> tuple[str, str] | None:
    """Compare a chain's last row (``0, GENESIS`` for none) with its head: ``(code, detail)`` when
    they disagree — ``chain_tail_missing`` (rows cut off the end) or ``chain_head_mismatch``
    (rows rewritten or appended without the head) — else ``None``."""
    seq, hash_ = head or (0, GENESIS)
    if last_seq < seq:
        first = last_seq + 1
        rows = f"row {seq}" if first == seq else f"rows {first}..{seq}"
        return "chain_tail_missing", f"{rows} missing at the end of the chain (its head is at row {seq})"
    if last_seq != seq or last_hash != hash_:
        return "chain_head_mismatch", f"the chain ends at row {last_seq}, its head is row {seq} with another hash"
    return None
