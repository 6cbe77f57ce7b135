"""audit forwarding: SIEM delivery cursor

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Not append-only (unlike the other audit tables): the cursor is delivery state that
    # moves forward; the records it points into stay protected by 0002's triggers.
    op.create_table(
        "audit_forward_cursors",
        sa.Column("destination", sa.String(length=300), nullable=False),
        sa.Column("next_leaf_index", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=200), nullable=True),
        sa.Column("last_delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_token", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("destination", name=op.f("pk_audit_forward_cursors")),
    )


def downgrade() -> None:
    op.drop_table("audit_forward_cursors")
