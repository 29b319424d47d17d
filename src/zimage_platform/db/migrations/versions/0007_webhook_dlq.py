"""webhook dead letters (retry deadline, last attempt, per-tenant listing) and per-tenant secrets

(After 0006_batch_idempotency: both were written at once on separate branches.)

Revision ID: 0007_webhook_dlq
Revises: 0006_batch_idempotency
Create Date: 2026-12-03 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

import zimage_platform.db.base

revision = "0007_webhook_dlq"
down_revision = "0006_batch_idempotency"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("last_attempt_at", zimage_platform.db.base.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("give_up_at", zimage_platform.db.base.UTCDateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "ix_webhook_deliveries_tenant_status", ["tenant_id", "status", "created_at"], unique=False
        )
    # Deliveries the old sender gave up on were never retried: they are dead letters now.
    op.execute("UPDATE webhook_deliveries SET status = 'dead_letter' WHERE status = 'failed'")
    op.create_table(
        "webhook_secrets",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("rotated_at", zimage_platform.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("previous_until", zimage_platform.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_webhook_secrets")),
    )


def downgrade() -> None:
    op.drop_table("webhook_secrets")
    op.execute("UPDATE webhook_deliveries SET status = 'failed' WHERE status = 'dead_letter'")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_tenant_status")
        batch_op.drop_column("give_up_at")
        batch_op.drop_column("last_attempt_at")
