"""Billing: the per-image ledger (hash-chained per tenant), usage totals, reports, statements, audits."""

from zimage_platform.billing.audit import KINDS, Finding, audit
from zimage_platform.billing.ledger import LedgerEntry, LedgerEntryRow, price
from zimage_platform.billing.usage import UsageLine, entries_of, ledger_rows, totals

__all__ = [
    "KINDS",
    "Finding",
    "LedgerEntry",
    "LedgerEntryRow",
    "UsageLine",
    "audit",
    "entries_of",
    "ledger_rows",
    "price",
    "totals",
]
