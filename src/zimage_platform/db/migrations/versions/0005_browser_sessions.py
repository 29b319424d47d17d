"""browser sessions and the ComfyUI frontend's user data per tenant

(Its own revision id, so it cannot collide with another branch's 0005: merged after another
0005, set ``down_revision`` to that one.)

Revision ID: 0005_browser
Revises: 0004
Create Date: 2026-12-03 08:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

import zimage_platform.db.base

revision = "0005_browser"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "browser_sessions",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", zimage_platform.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", zimage_platform.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_browser_sessions")),
    )
    with op.batch_alter_table("browser_sessions", schema=None) as batch_op:
        batch_op.create_index("ix_browser_sessions_expires", ["expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_browser_sessions_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "browser_userdata",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", zimage_platform.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("modified_at", zimage_platform.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "path", name=op.f("pk_browser_userdata")),
    )
    with op.batch_alter_table("browser_userdata", schema=None) as batch_op:
        batch_op.create_index("ix_browser_userdata_tenant_modified", ["tenant_id", "modified_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("browser_userdata", schema=None) as batch_op:
        batch_op.drop_index("ix_browser_userdata_tenant_modified")
    op.drop_table("browser_userdata")
    with op.batch_alter_table("browser_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_browser_sessions_tenant_id"))
        batch_op.drop_index("ix_browser_sessions_expires")
    op.drop_table("browser_sessions")
