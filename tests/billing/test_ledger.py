"""The ledger on SQLite and PostgreSQL, against a real S3: billing, totals, statements, and an
audit that names every kind of tampering planted here."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from PIL import Image
from sqlalchemy import delete, func, select, update
from typer.testing import CliRunner

from zimage_platform.billing import KINDS, LedgerEntry, LedgerEntryRow, audit, price
from zimage_platform.billing.ledger import append_entry
from zimage_platform.billing.report import month_bounds, render_csv, report_lines, write_parquet, write_statement
from zimage_platform.cli import app
from zimage_platform.config import BillingConfig
from zimage_platform.db import create_db_engine
from zimage_platform.db.chain import link_hash
from zimage_platform.scheduling.models import JobImageRow, JobRow
from zimage_platform.scheduling.store import JobStore, NewJob, StoredImage
from zimage_platform.storage.results import ResultStore

PARAMS = {"prompt": "p", "size": "1024x1024", "steps": 8, "guidance": 0.0, "sampler": "euler", "shift": 3.0}
TODAY = datetime.now(UTC).date()


@pytest.fixture
def results(s3) -> ResultStore:
    return ResultStore("results", endpoint_url=s3.endpoint_url, access_key=s3.access_key, secret_key=s3.secret_key)


@pytest.fixture
def store(database_url) -> JobStore:
    return JobStore(create_db_engine(database_url), billing=BillingConfig())


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 7, 9)).save(buf, format="PNG")
    return buf.getvalue()


def deliver(store: JobStore, results: ResultStore, tenant: str, n: int = 3, plan: str = "standard") -> str:
    """A job whose images are stored in S3 and recorded (and billed) the way the scheduler does it."""
    row, _ = store.create(
        NewJob(tenant_id=tenant, variant="turbo", kind="text2img", params=PARAMS, seeds=list(range(n)), plan=plan)
    )
    for index in range(n):
        key = results.image_key(tenant, row.id, index, row.created_at)
        stored = results.put_image(key, png(index + hash(row.id)), {"job-id": row.id})
        entry = LedgerEntry(
            tenant_id=tenant,
            job_id=row.id,
            image_index=index,
            plan=plan,
            variant="turbo",
            bucket="1024x1024",
            steps=8,
            backend="tensorrt",
            pool="realtime",
            mig_profile="3g.40gb",
            batch_size=2,
            gpu_seconds=0.9 * 3 / 7,
            s3_key=key,
            sha256=stored.sha256,
            size_bytes=stored.size,
            etag=stored.etag,
            trace_id="ab" * 16,
            job_created_at=row.created_at,
            delivered_at=datetime.now(UTC),
        )
        image = StoredImage(
            s3_key=key, sha256=stored.sha256, size_bytes=stored.size, timings=[], batch_size=2, engine_s=0.9
        )
        assert store.record_image(row.id, index, image, entry)
    return row.id


def ledger(store: JobStore, tenant: str) -> list[LedgerEntryRow]:
    with store.session() as s:
        return list(
            s.scalars(
                select(LedgerEntryRow).where(LedgerEntryRow.tenant_id == tenant).order_by(LedgerEntryRow.chain_seq)
            )
        )


def kinds(store, results, tenant="acme") -> list[str]:
    return sorted({f.kind for f in audit(store.engine, results, tenant_id=tenant, start=TODAY, end=TODAY)})


def test_prices_come_from_the_plan_table():
    billing = BillingConfig()
    assert price(billing, "standard", "turbo", "1024x1024") == (Decimal("0.003146"), "USD")
    assert price(billing, "enterprise", "turbo", "1024x1024")[0] == Decimal("0.002517")
    assert price(billing, "standard", "turbo", "64x64")[0] == Decimal("0.000500")  # the minimum
    assert price(billing, "unknown-plan", "base", "512x512")[0] == Decimal("0.002359")  # default plan
    assert price(billing, "demo", "edit", "1024x1024")[0] == Decimal("0")


def test_one_chained_row_per_delivered_image_never_twice(store, results):
    job = deliver(store, results, "acme")
    deliver(store, results, "globex", n=2)
    rows = ledger(store, "acme")
    assert [r.chain_seq for r in rows] == [1, 2, 3] and [r.image_index for r in rows] == [0, 1, 2]
    assert rows[0].prev_hash == "0" * 64 and rows[1].prev_hash == rows[0].hash
    assert rows[0].gpu_seconds == pytest.approx(0.9 * 3 / 7) and rows[0].mig_profile == "3g.40gb"
    assert rows[0].unit_price == Decimal("0.003146") and rows[0].currency == "USD"
    assert [r.chain_seq for r in ledger(store, "globex")] == [1, 2]  # chains are per tenant
    # A retry that records the image again bills nothing more.
    again = StoredImage(
        s3_key=rows[0].s3_key,
        sha256=rows[0].sha256,
        size_bytes=rows[0].size_bytes,
        timings=[],
        batch_size=2,
        engine_s=0.9,
    )
    assert store.record_image(job, 0, again, replace(_entry_of(rows[0]))) is False
    assert len(ledger(store, "acme")) == 3
    assert kinds(store, results) == []


def _entry_of(row: LedgerEntryRow) -> LedgerEntry:
    return LedgerEntry(
        tenant_id=row.tenant_id,
        job_id=row.job_id,
        image_index=row.image_index,
        plan=row.plan,
        variant=row.variant,
        bucket=row.bucket,
        steps=row.steps,
        backend=row.backend,
        pool=row.pool,
        mig_profile=row.mig_profile,
        batch_size=row.batch_size,
        gpu_seconds=row.gpu_seconds,
        s3_key=row.s3_key,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        etag=row.etag,
        trace_id=row.trace_id,
        job_created_at=row.job_created_at,
        delivered_at=row.delivered_at,
    )


def test_audit_names_an_altered_row(store, results):
    deliver(store, results, "acme")
    with store.session() as s, s.begin():
        s.execute(
            update(LedgerEntryRow)
            .where(LedgerEntryRow.chain_seq == 2, LedgerEntryRow.tenant_id == "acme")
            .values(unit_price=Decimal("0.000001"))
        )
    assert kinds(store, results) == ["row_altered"]


def test_audit_names_a_row_missing_from_the_chain(store, results):
    deliver(store, results, "acme")
    with store.session() as s, s.begin():
        s.execute(delete(LedgerEntryRow).where(LedgerEntryRow.chain_seq == 2, LedgerEntryRow.tenant_id == "acme"))
    assert kinds(store, results) == ["delivered_not_billed", "row_missing_from_chain"]


def test_audit_names_a_cut_tail_of_the_chain(store, results):
    """Deleting the last rows breaks no hash: the audit compares the chain's end with its head."""
    deliver(store, results, "acme")
    with store.session() as s, s.begin():
        s.execute(delete(LedgerEntryRow).where(LedgerEntryRow.chain_seq >= 2, LedgerEntryRow.tenant_id == "acme"))
    findings = audit(store.engine, results, tenant_id="acme", start=TODAY, end=TODAY)
    tail = [f for f in findings if f.kind == "chain_tail_missing"]
    assert len(tail) == 1 and "rows 2..3 missing" in tail[0].detail
    # A tenant whose every row was cut (and its jobs with them) still has its head: an audit of
    # all tenants names it, though nothing of it is left in the range.
    deliver(store, results, "initech", n=1)
    with store.session() as s, s.begin():
        s.execute(delete(LedgerEntryRow).where(LedgerEntryRow.tenant_id == "initech"))
        s.execute(
            delete(JobImageRow).where(JobImageRow.job_id.in_(select(JobRow.id).where(JobRow.tenant_id == "initech")))
        )
        s.execute(delete(JobRow).where(JobRow.tenant_id == "initech"))
    everyone = audit(store.engine, results, tenant_id=None, start=TODAY, end=TODAY)
    assert ("chain_tail_missing", "initech") in {(f.kind, f.tenant_id) for f in everyone}


def test_audit_names_a_chain_rewritten_around_its_head(store, results):
    """Whoever alters the last row and re-hashes it passes the chain check, not the head's."""
    deliver(store, results, "acme", n=2)
    last = ledger(store, "acme")[-1]
    last.unit_price = Decimal("0.000001")
    with store.session() as s, s.begin():
        s.execute(
            update(LedgerEntryRow)
            .where(LedgerEntryRow.id == last.id)
            .values(unit_price=last.unit_price, hash=link_hash(last.prev_hash, last.content()))
        )
    assert kinds(store, results) == ["chain_head_mismatch"]


def test_audit_names_missing_and_altered_objects(store, results):
    deliver(store, results, "acme")
    first, second = ledger(store, "acme")[:2]
    client = results._client
    client.delete_object(Bucket="results", Key=first.s3_key)
    client.put_object(Bucket="results", Key=second.s3_key, Body=png(999), Metadata={"sha256": second.sha256})
    findings = audit(store.engine, results, tenant_id="acme", start=TODAY, end=TODAY)
    assert {(f.kind, f.image_index) for f in findings} == {("object_missing", 0), ("object_altered", 1)}
    deep = audit(store.engine, results, tenant_id="acme", start=TODAY, end=TODAY, deep=True)
    assert {f.kind for f in deep} == {"object_missing", "object_altered"}


def test_audit_names_delivered_not_billed_and_billed_not_delivered(store, results):
    job = deliver(store, results, "acme", n=1)
    other, _ = store.create(NewJob(tenant_id="acme", variant="turbo", kind="text2img", params=PARAMS, seeds=[1, 2]))
    store.record_image(
        other.id, 0, StoredImage(s3_key="k", sha256="0" * 64, size_bytes=1, timings=[], batch_size=1, engine_s=0.1)
    )  # done, never billed
    bogus = replace(_entry_of(ledger(store, "acme")[0]), job_id=other.id, image_index=1)
    with store.session() as s, s.begin():
        append_entry(s, store.billing, bogus)  # billed, image still pending
    found = kinds(store, results)
    assert "delivered_not_billed" in found and "billed_not_delivered" in found
    assert job


def test_every_finding_kind_is_documented():
    assert set(KINDS) == {
        "row_altered",
        "row_missing_from_chain",
        "chain_tail_missing",
        "chain_head_mismatch",
        "object_missing",
        "object_altered",
        "delivered_not_billed",
        "billed_not_delivered",
    }


def test_reports_and_monthly_statements(store, results, tmp_path):
    deliver(store, results, "acme", n=3)
    deliver(store, results, "acme", n=1, plan="enterprise")
    lines, total = report_lines(store.engine, "acme", TODAY, TODAY)
    assert total.images == 4 and total.amount == Decimal("0.003146") * 3 + Decimal("0.002517")
    assert [(line.day, line.variant, line.images) for line in lines] == [(TODAY.isoformat(), "turbo", 4)]
    assert "turbo,4," in render_csv(lines)
    write_parquet(lines, tmp_path / "usage.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "usage.parquet")
    assert table.column("images").to_pylist() == [4]
    month = TODAY.strftime("%Y-%m")
    assert month_bounds(month)[0] == date(TODAY.year, TODAY.month, 1)
    csv_key, html_key, amount = write_statement(store.engine, results, "acme", month)
    assert amount == total.amount
    page = results.get_bytes(html_key).decode()
    assert "<svg" in page and str(total.amount) in page and "acme" in page
    assert results.get_bytes(csv_key).decode().count("\n") == 5
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(JobImageRow).where(JobImageRow.status == "done")) == 4


def test_audit_command_pushes_its_outcome_for_alerting(store, results, database_url, s3, tmp_path, monkeypatch):
    """`billing audit --pushgateway` sends what the `BillingAuditFindings` alert reads.

    The receiver is a local HTTP server speaking the Pushgateway's push protocol (PUT
    /metrics/job/<job> with the text exposition); the real Pushgateway is not packaged here.
    """
    import http.server
    import threading

    from prometheus_client.parser import text_string_to_metric_families

    pushes: list[tuple[str, str, str]] = []

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            pushes.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    job = deliver(store, results, "acme", n=2)
    results._client.delete_object(Bucket="results", Key=ledger(store, "acme")[0].s3_key)
    config_file = cli_config(tmp_path, database_url, s3, monkeypatch)
    gateway = f"127.0.0.1:{server.server_address[1]}"
    try:
        result = cli(
            config_file,
            [
                "billing",
                "audit",
                "--from",
                "yesterday",
                "--to",
                "today",
                "--tenant",
                "acme",
                "--pushgateway",
                gateway,
            ],
        )
    finally:
        server.shutdown()
    assert result.exit_code == 1 and job in result.stdout
    ((method, path, body),) = pushes
    assert (method, path) == ("PUT", "/metrics/job/zimage-billing-audit")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("zimage_billing_audit_findings", (("kind", "object_missing"),))] == 1
    assert all(samples[("zimage_billing_audit_findings", (("kind", k),))] == 0 for k in KINDS if k != "object_missing")
    assert samples[("zimage_billing_audit_last_run_timestamp_seconds", (("outcome", "findings"),))] > 0


def cli_config(tmp_path, database_url: str, s3, monkeypatch) -> Path:
    """A config file pointing the CLI at this test's database and S3, as an operator's would."""
    path = tmp_path / "zimage-platform.yaml"
    settings = {
        "database": {"url": database_url},
        "storage": {"endpoint_url": s3.endpoint_url, "bucket": "results"},
        "paths": {"data_dir": str(tmp_path / "var")},
    }
    path.write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    return path


def cli(config_file: Path, args: list[str]):
    return CliRunner().invoke(app, ["--config", str(config_file), *args])


def test_the_bill_of_one_job_or_trace(store, results, database_url, s3, tmp_path, monkeypatch):
    job = deliver(store, results, "acme", n=2)
    deliver(store, results, "acme", n=1)
    config_file = cli_config(tmp_path, database_url, s3, monkeypatch)
    by_job = cli(config_file, ["billing", "entries", "--job", job])
    assert by_job.exit_code == 0, by_job.output
    rows = [json.loads(line) for line in by_job.stdout.splitlines()]
    assert [(r["job_id"], r["image_index"]) for r in rows] == [(job, 0), (job, 1)]
    assert all(r["trace_id"] == "ab" * 16 and r["unit_price"] and len(r["hash"]) == 64 for r in rows)
    by_trace = cli(config_file, ["billing", "entries", "--trace", "ab" * 16])
    assert len(by_trace.stdout.splitlines()) == 3
    assert cli(config_file, ["billing", "entries", "--job", "job_unknown"]).exit_code == 1
    assert cli(config_file, ["billing", "entries"]).exit_code != 0
