"""Billing outputs: usage reports (table, CSV, Parquet) and monthly statements (CSV + HTML) in S3."""

from __future__ import annotations

import csv
import html
import io
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

from sqlalchemy import Engine

from zimage_platform.billing.ledger import LedgerEntryRow
from zimage_platform.billing.usage import UsageLine, ledger_rows, totals
from zimage_platform.storage.results import ResultStore

COLUMNS = ("day", "variant", "images", "gpu_seconds", "amount", "currency")


def report_lines(engine: Engine, tenant_id: str | None, start: date, end: date) -> tuple[list[UsageLine], UsageLine]:
    """Totals by day and variant (the shape finance reconciles against invoices)."""
    return totals(ledger_rows(engine, tenant_id, start, end), "day_variant")


def render_table(lines: list[UsageLine], total: UsageLine) -> str:
    rows = [
        [line.day, line.variant, str(line.images), f"{line.gpu_seconds:.3f}", str(line.amount), line.currency]
        for line in lines
    ]
    rows.append(["total", "", str(total.images), f"{total.gpu_seconds:.3f}", str(total.amount), total.currency])
    widths = [max(len(str(c)) for c in col) for col in zip(COLUMNS, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [list(COLUMNS), *rows])


def render_csv(lines: list[UsageLine]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for line in lines:
        writer.writerow([line.day, line.variant, line.images, f"{line.gpu_seconds:.6f}", line.amount, line.currency])
    return out.getvalue()


def write_parquet(lines: list[UsageLine], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "day": [line.day for line in lines],
            "variant": [line.variant for line in lines],
            "images": pa.array([line.images for line in lines], pa.int64()),
            "gpu_seconds": pa.array([line.gpu_seconds for line in lines], pa.float64()),
            "amount": pa.array([line.amount for line in lines], pa.decimal128(18, 6)),
            "currency": [line.currency for line in lines],
        }
    )
    pq.write_table(table, path)


# -- monthly statements ---------------------------------------------------------------------


def month_bounds(month: str) -> tuple[date, date]:
    start = date.fromisoformat(f"{month}-01")
    end = (start + timedelta(days=32)).replace(day=1) - timedelta(days=1)
    return start, end


def statement_csv(rows: list[LedgerEntryRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "delivered_at",
            "job_id",
            "image_index",
            "variant",
            "bucket",
            "steps",
            "pool",
            "mig_profile",
            "gpu_seconds",
            "unit_price",
            "currency",
            "s3_key",
            "sha256",
            "trace_id",
            "chain_seq",
        ]
    )
    for r in rows:
        writer.writerow(
            [
                r.delivered_at.isoformat(),
                r.job_id,
                r.image_index,
                r.variant,
                r.bucket,
                r.steps,
                r.pool,
                r.mig_profile or "",
                f"{r.gpu_seconds:.6f}",
                r.unit_price,
                r.currency,
                r.s3_key,
                r.sha256,
                r.trace_id or "",
                r.chain_seq,
            ]
        )
    return out.getvalue()


def usage_chart_svg(days: list[UsageLine], width: int = 640, height: int = 180) -> str:
    """Images per day as an inline SVG bar chart (no plotting library needed on a server)."""
    if not days:
        return f'<svg width="{width}" height="{height}" role="img"><text x="10" y="20">no usage</text></svg>'
    top = max(d.images for d in days)
    bar = width / len(days)
    bars = []
    for i, d in enumerate(days):
        h = (height - 30) * d.images / top
        bars.append(
            f'<rect x="{i * bar + 1:.1f}" y="{height - 20 - h:.1f}" width="{max(bar - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="#4e79a7"><title>{d.day}: {d.images} images</title></rect>'
        )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="images per day">'
        f'<text x="0" y="12" font-size="11">max {top} images/day</text>{"".join(bars)}'
        f'<text x="0" y="{height - 4}" font-size="11">{days[0].day}</text>'
        f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{days[-1].day}</text></svg>'
    )


def statement_html(tenant_id: str, month: str, rows: list[LedgerEntryRow]) -> str:
    by_day, total = totals(rows, "day")
    by_variant, _ = totals(rows, "variant")
    items = "".join(
        f"<tr><td>{html.escape(v.variant or '')}</td><td>{v.images}</td><td>{v.gpu_seconds:.1f}</td>"
        f"<td>{v.amount} {v.currency}</td></tr>"
        for v in by_variant
    )
    title = f"Statement {html.escape(tenant_id)} {month}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:720px;margin:2em auto}}td,th{{padding:4px 12px;text-align:left}}</style>
</head><body><h1>Usage statement</h1>
<p>Tenant <b>{html.escape(tenant_id)}</b>, {month} (UTC). {total.images} images, {total.gpu_seconds:.1f} GPU-seconds,
total <b>{total.amount} {total.currency}</b>.</p>
{usage_chart_svg(by_day)}
<table><tr><th>Variant</th><th>Images</th><th>GPU-seconds</th><th>Amount</th></tr>{items}</table>
<p>Every line of the attached CSV is a ledger row, hash-chained per tenant; run
<code>zimage-platform billing audit --tenant {html.escape(tenant_id)}</code> to verify it against S3.</p>
</body></html>"""


def write_statement(engine: Engine, results: ResultStore, tenant_id: str, month: str) -> tuple[str, str, Decimal]:
    """The month's statement as CSV + one-page HTML in the tenant's S3 prefix; returns their keys."""
    start, end = month_bounds(month)
    rows = ledger_rows(engine, tenant_id, start, end)
    prefix = f"tenants/{tenant_id}/billing/statements/{month}"
    csv_key, html_key = f"{prefix}/statement.csv", f"{prefix}/statement.html"
    results.put_bytes(csv_key, statement_csv(rows).encode(), "text/csv", {"tenant-id": tenant_id, "month": month})
    results.put_bytes(
        html_key,
        statement_html(tenant_id, month, rows).encode(),
        "text/html; charset=utf-8",
        {"tenant-id": tenant_id, "month": month},
    )
    _, total = totals(rows, "day")
    return csv_key, html_key, total.amount
