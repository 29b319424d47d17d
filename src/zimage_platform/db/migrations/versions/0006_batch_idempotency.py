"""bulk batches take an Idempotency-Key (same key + same request → the same batch)

(Its own revision id, so it cannot collide with another branch's 0006: merged after another
0006, set ``down_revision`` to that one.)

Revision ID: 0006_batch_idempotency
Revises: 0005_browser
Create Date: 2026-12-10 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_batch_idempotency"
down_revision = "0005_browser"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint("uq_batches_tenant_idempotency", ["tenant_id", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_constraint("uq_batches_tenant_idempotency", type_="unique")
        batch_op.drop_column("request_hash")
        batch_op.drop_column("idempotency_key")
