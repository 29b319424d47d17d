"""Every table the platform owns, imported in one place for Alembic and create_all."""

from zimage_platform.billing.ledger import LedgerEntryRow
from zimage_platform.browser import BrowserSessionRow, UserFileRow
from zimage_platform.db.chain import ChainHeadRow
from zimage_platform.scheduling.models import BatchRow, JobImageRow, JobRow, WebhookDeliveryRow
from zimage_platform.tenancy.audit import AuditEventRow
from zimage_platform.tenancy.webhook_secrets import WebhookSecretRow
from zimage_platform.workflows.models import ComfyCounterRow, ComfyFileRow, ComfyPromptRow, WorkflowRow

__all__ = [
    "AuditEventRow",
    "BatchRow",
    "BrowserSessionRow",
    "ChainHeadRow",
    "ComfyCounterRow",
    "ComfyFileRow",
    "ComfyPromptRow",
    "JobImageRow",
    "JobRow",
    "LedgerEntryRow",
    "UserFileRow",
    "WebhookDeliveryRow",
    "WebhookSecretRow",
    "WorkflowRow",
]
