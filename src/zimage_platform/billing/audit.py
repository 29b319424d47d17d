"""The billing audit: is every bill real, and every delivered image billed?

Three sources must agree: the ledger (hash-chained per tenant), the S3 objects it points to,
and the job rows that say which images were delivered. Every disagreement is a finding with a
kind finance can act on:

- ``row_altered``: a ledger row's content no longer matches its hash;
- ``row_missing_from_chain``: a gap or break in a tenant's chain (a row was deleted or inserted);
- ``chain_tail_missing``: the chain stops short of its head (its last rows were deleted);
- ``chain_head_mismatch``: the chain's last row is not its head (rows rewritten or appended
  around the chain head);
- ``object_missing``: the billed image is not in S3;
- ``object_altered``: the S3 object's bytes (its server-side SHA-256, or size) are not what was billed;
- ``delivered_not_billed``: a job image marked done has no ledger row;
- ``billed_not_delivered``: a ledger row for an image that is not marked done.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import Engine, select

from zimage_platform.billing.ledger import LedgerEntryRow, chain_name
from zimage_platform.billing.usage import day_range, ledger_rows
from zimage_platform.db import session_factory
from zimage_platform.db.chain import GENESIS, head_mismatch, heads, link_hash
from zimage_platform.scheduling.models import JobImageRow, JobRow
from zimage_platform.storage.results import ResultStore, sha256_hex

KINDS = (
    "row_altered",
    "row_missing_from_chain",
    "chain_tail_missing",
    "chain_head_mismatch",
    "object_missing",
    "object_altered",
    "delivered_not_billed",
    "billed_not_delivered",
)


@dataclass(frozen=True)
class Finding:
    kind: str
    tenant_id: str
    job_id: str | None
    image_index: int | None
    detail: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def verify_chain(tenant_id: str, rows: list[LedgerEntryRow], head: tuple[int, str] | None) -> list[Finding]:
    """``rows``: one tenant's whole chain, by sequence; ``head``: its chain head ``(seq, hash)``."""
    findings: list[Finding] = []
    prev, expected = GENESIS, 1
    for row in rows:
        if row.chain_seq != expected or row.prev_hash != prev:
            findings.append(
                Finding(
                    "row_missing_from_chain",
                    row.tenant_id,
                    row.job_id,
                    row.image_index,
                    f"row {row.chain_seq} does not follow row {expected - 1}",
                )
            )
        if link_hash(row.prev_hash, row.content()) != row.hash:
            findings.append(
                Finding(
                    "row_altered",
                    row.tenant_id,
                    row.job_id,
                    row.image_index,
                    f"row {row.chain_seq}: content does not match its hash",
                )
            )
        prev, expected = row.hash, row.chain_seq + 1
    if (mismatch := head_mismatch(expected - 1, prev, head)) is not None:
        findings.append(Finding(mismatch[0], tenant_id, None, None, mismatch[1]))
    return findings


def check_object(results: ResultStore, row: LedgerEntryRow, *, deep: bool = False) -> Finding | None:
    """The object must exist with the billed size, SHA-256 and ETag: the server's checksum when
    the store keeps one (and the ETag, which any overwrite changes), the bytes themselves with
    ``deep`` (slower: downloads every image)."""
    head = results.head(row.s3_key)
    if head is None:
        return Finding("object_missing", row.tenant_id, row.job_id, row.image_index, f"s3 key {row.s3_key} is gone")
    size, server_sha = head.size, head.checksum_sha256 or head.sha256
    if deep:
        server_sha = sha256_hex(results.get_bytes(row.s3_key))
    replaced = row.etag is not None and head.etag is not None and head.etag != row.etag
    if size != row.size_bytes or server_sha != row.sha256 or replaced:
        return Finding(
            "object_altered",
            row.tenant_id,
            row.job_id,
            row.image_index,
            f"s3 key {row.s3_key}: {size} bytes, sha256 {server_sha}; billed {row.size_bytes} bytes, "
            f"sha256 {row.sha256}",
        )
    return None


def audit(
    engine: Engine, results: ResultStore, *, tenant_id: str | None, start: date, end: date, deep: bool = False
) -> list[Finding]:
    findings: list[Finding] = []
    sessions = session_factory(engine)
    in_range = ledger_rows(engine, tenant_id, start, end)
    with sessions() as s:
        # Every chain with a head is checked: a tenant whose last rows were all cut has none left in range.
        chain_heads = heads(s, chain_name(tenant_id or ""))
        tenants = {r.tenant_id for r in in_range} | ({tenant_id} if tenant_id else set())
        if tenant_id is None:
            tenants |= {name.removeprefix(chain_name("")) for name in chain_heads}
        for tenant in sorted(tenants):
            chain = list(
                s.scalars(
                    select(LedgerEntryRow).where(LedgerEntryRow.tenant_id == tenant).order_by(LedgerEntryRow.chain_seq)
                )
            )
            findings += verify_chain(tenant, chain, chain_heads.get(chain_name(tenant)))
    for row in in_range:
        found = check_object(results, row, deep=deep)
        if found:
            findings.append(found)
    billed = {(r.job_id, r.image_index): r for r in in_range}
    lo, hi = day_range(start, end)
    with sessions() as s:
        q = (
            select(JobRow.tenant_id, JobImageRow.job_id, JobImageRow.index, JobImageRow.status)
            .join(JobRow, JobRow.id == JobImageRow.job_id)
            .where(JobImageRow.finished_at >= lo, JobImageRow.finished_at < hi)
        )
        if tenant_id:
            q = q.where(JobRow.tenant_id == tenant_id)
        images = {(job, index): (tenant, status) for tenant, job, index, status in s.execute(q)}
        for (job, index), (tenant, status) in images.items():
            if status == "done" and (job, index) not in billed:
                findings.append(Finding("delivered_not_billed", tenant, job, index, "image done, no ledger row"))
        for (job, index), row in billed.items():
            state = images.get((job, index))
            if state is None:
                image = s.get(JobImageRow, (job, index))
                state = (row.tenant_id, image.status if image else "missing")
            if state[1] != "done":
                findings.append(
                    Finding("billed_not_delivered", row.tenant_id, job, index, f"billed, but the image is {state[1]}")
                )
    return findings
