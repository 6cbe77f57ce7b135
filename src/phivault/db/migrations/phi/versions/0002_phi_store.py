"""phi store: patients, studies, instances

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 13:09:11.960797
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "phi_patients",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("patient_key_id", sa.String(length=36), nullable=False),
        sa.Column("patient_id_index", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.LargeBinary(), nullable=False),
        sa.Column("issuer_of_patient_id", sa.LargeBinary(), nullable=False),
        sa.Column("patient_name", sa.LargeBinary(), nullable=False),
        sa.Column("birth_date", sa.LargeBinary(), nullable=False),
        sa.Column("sex", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_phi_patients")),
        sa.UniqueConstraint(
            "institution_id", "patient_id_index", name=op.f("uq_phi_patients_institution_id")
        ),
    )
    op.create_table(
        "phi_instances",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=36), nullable=False),
        sa.Column("study_id", sa.String(length=36), nullable=False),
        sa.Column("record", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_id"], ["phi_patients.id"], name=op.f("fk_phi_instances_patient_id_phi_patients")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_phi_instances")),
    )
    with op.batch_alter_table("phi_instances", schema=None) as batch_op:
        batch_op.create_index("ix_phi_instances_created", ["created_at"], unique=False)
        batch_op.create_index("ix_phi_instances_patient", ["patient_id"], unique=False)
        batch_op.create_index("ix_phi_instances_study", ["study_id"], unique=False)

    op.create_table(
        "phi_studies",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=36), nullable=False),
        sa.Column("accession_number_index", sa.String(length=64), nullable=True),
        sa.Column("study_date_index", sa.String(length=64), nullable=True),
        sa.Column("record", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_id"], ["phi_patients.id"], name=op.f("fk_phi_studies_patient_id_phi_patients")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_phi_studies")),
    )
    with op.batch_alter_table("phi_studies", schema=None) as batch_op:
        batch_op.create_index(
            "ix_phi_studies_accession", ["institution_id", "accession_number_index"], unique=False
        )
        batch_op.create_index("ix_phi_studies_date", ["institution_id", "study_date_index"], unique=False)
        batch_op.create_index("ix_phi_studies_patient", ["patient_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("phi_studies", schema=None) as batch_op:
        batch_op.drop_index("ix_phi_studies_patient")
        batch_op.drop_index("ix_phi_studies_date")
        batch_op.drop_index("ix_phi_studies_accession")

    op.drop_table("phi_studies")
    with op.batch_alter_table("phi_instances", schema=None) as batch_op:
        batch_op.drop_index("ix_phi_instances_study")
        batch_op.drop_index("ix_phi_instances_patient")
        batch_op.drop_index("ix_phi_instances_created")

    op.drop_table("phi_instances")
    op.drop_table("phi_patients")
