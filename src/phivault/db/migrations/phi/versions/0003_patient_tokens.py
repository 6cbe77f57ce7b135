"""phi store: blind-index tokens of patients' names and PatientIDs (QIDO-RS)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "phi_patient_tokens",
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.Column("patient_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["phi_patients.id"],
            name=op.f("fk_phi_patient_tokens_patient_id_phi_patients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("institution_id", "token", "patient_id", name=op.f("pk_phi_patient_tokens")),
    )
    with op.batch_alter_table("phi_patient_tokens", schema=None) as batch_op:
        batch_op.create_index("ix_phi_patient_tokens_patient", ["patient_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("phi_patient_tokens", schema=None) as batch_op:
        batch_op.drop_index("ix_phi_patient_tokens_patient")
    op.drop_table("phi_patient_tokens")
