"""exams: de-identified index, quarantine, ingest policy, DICOM nodes

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 13:09:14.151465
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_quotas",
        sa.Column("device_id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("quota_bytes", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_quotas")),
    )
    with op.batch_alter_table("device_quotas", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_quotas_institution_id"), ["institution_id"], unique=False)

    op.create_table(
        "orphan_candidates",
        sa.Column("object_key", sa.String(length=200), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("object_key", name=op.f("pk_orphan_candidates")),
    )
    op.create_table(
        "dicom_nodes",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("device_id", sa.String(length=36), nullable=True),
        sa.Column("description", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["institution_id"], ["institutions.id"], name=op.f("fk_dicom_nodes_institution_id_institutions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dicom_nodes")),
        sa.UniqueConstraint("ae_title", name=op.f("uq_dicom_nodes_ae_title")),
    )
    with op.batch_alter_table("dicom_nodes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dicom_nodes_institution_id"), ["institution_id"], unique=False)

    op.create_table(
        "ingest_policies",
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("retain_modified_dates", sa.Boolean(), nullable=False),
        sa.Column("retain_device_identity", sa.Boolean(), nullable=False),
        sa.Column("retain_patient_characteristics", sa.Boolean(), nullable=False),
        sa.Column("clean_descriptors", sa.Boolean(), nullable=False),
        sa.Column("private_allow_list", sa.JSON(), nullable=False),
        sa.Column("pixel_rules", sa.JSON(), nullable=False),
        sa.Column("institution_quota_bytes", sa.BigInteger(), nullable=True),
        sa.Column("device_quota_bytes", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["institution_id"],
            ["institutions.id"],
            name=op.f("fk_ingest_policies_institution_id_institutions"),
        ),
        sa.PrimaryKeyConstraint("institution_id", name=op.f("pk_ingest_policies")),
    )
    op.create_table(
        "institution_secrets",
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("patient_key_id", sa.String(length=36), nullable=False),
        sa.Column("sealed_secret", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["institution_id"],
            ["institutions.id"],
            name=op.f("fk_institution_secrets_institution_id_institutions"),
        ),
        sa.ForeignKeyConstraint(
            ["patient_key_id"],
            ["patient_keys.id"],
            name=op.f("fk_institution_secrets_patient_key_id_patient_keys"),
        ),
        sa.PrimaryKeyConstraint("institution_id", name=op.f("pk_institution_secrets")),
    )
    op.create_table(
        "quarantined_instances",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("patient_key_id", sa.String(length=36), nullable=False),
        sa.Column("patient_ref", sa.String(length=36), nullable=False),
        sa.Column("object_key", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("manufacturer", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("received_size", sa.BigInteger(), nullable=False),
        sa.Column("received_sha256", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("device_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.String(length=36), nullable=True),
        sa.Column("instance_id", sa.String(length=36), nullable=True),
        sa.ForeignKeyConstraint(
            ["institution_id"],
            ["institutions.id"],
            name=op.f("fk_quarantined_instances_institution_id_institutions"),
        ),
        sa.ForeignKeyConstraint(
            ["patient_key_id"],
            ["patient_keys.id"],
            name=op.f("fk_quarantined_instances_patient_key_id_patient_keys"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantined_instances")),
        sa.UniqueConstraint("object_key", name=op.f("uq_quarantined_instances_object_key")),
    )
    with op.batch_alter_table("quarantined_instances", schema=None) as batch_op:
        batch_op.create_index("ix_quarantine_device_size", ["device_id", "received_size"], unique=False)
        batch_op.create_index(
            "ix_quarantine_institution_sop", ["institution_id", "sop_instance_uid"], unique=False
        )
        batch_op.create_index(
            "ix_quarantine_institution_status", ["institution_id", "status", "created_at"], unique=False
        )

    op.create_table(
        "studies",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("patient_ref", sa.String(length=36), nullable=False),
        sa.Column("patient_key_id", sa.String(length=36), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=False),
        sa.Column("study_time", sa.String(length=16), nullable=False),
        sa.Column("study_description", sa.String(length=64), nullable=False),
        sa.Column("modalities", sa.String(length=64), nullable=False),
        sa.Column("number_of_series", sa.Integer(), nullable=False),
        sa.Column("number_of_instances", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["institution_id"], ["institutions.id"], name=op.f("fk_studies_institution_id_institutions")
        ),
        sa.ForeignKeyConstraint(
            ["patient_key_id"], ["patient_keys.id"], name=op.f("fk_studies_patient_key_id_patient_keys")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("institution_id", "study_instance_uid", name=op.f("uq_studies_institution_id")),
    )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index(
            "ix_studies_institution_created", ["institution_id", "created_at"], unique=False
        )
        batch_op.create_index(
            "ix_studies_institution_patient", ["institution_id", "patient_ref"], unique=False
        )

    op.create_table(
        "series",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("study_id", sa.String(length=36), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(length=64), nullable=False),
        sa.Column("number_of_instances", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_series_study_id_studies")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("institution_id", "series_instance_uid", name=op.f("uq_series_institution_id")),
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index("ix_series_study", ["study_id"], unique=False)

    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("study_id", sa.String(length=36), nullable=False),
        sa.Column("series_id", sa.String(length=36), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("object_key", sa.String(length=200), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("received_size", sa.BigInteger(), nullable=False),
        sa.Column("received_sha256", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("device_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"], name=op.f("fk_instances_series_id_series")),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_instances_study_id_studies")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("institution_id", "sop_instance_uid", name=op.f("uq_instances_institution_id")),
        sa.UniqueConstraint("object_key", name=op.f("uq_instances_object_key")),
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index("ix_instances_device_size", ["device_id", "received_size"], unique=False)
        batch_op.create_index(
            "ix_instances_institution_size", ["institution_id", "received_size"], unique=False
        )
        batch_op.create_index("ix_instances_series", ["series_id"], unique=False)
        batch_op.create_index("ix_instances_study", ["study_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index("ix_instances_study")
        batch_op.drop_index("ix_instances_series")
        batch_op.drop_index("ix_instances_institution_size")
        batch_op.drop_index("ix_instances_device_size")

    op.drop_table("instances")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index("ix_series_study")

    op.drop_table("series")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_institution_patient")
        batch_op.drop_index("ix_studies_institution_created")

    op.drop_table("studies")
    with op.batch_alter_table("quarantined_instances", schema=None) as batch_op:
        batch_op.drop_index("ix_quarantine_institution_status")
        batch_op.drop_index("ix_quarantine_institution_sop")
        batch_op.drop_index("ix_quarantine_device_size")

    op.drop_table("quarantined_instances")
    op.drop_table("institution_secrets")
    op.drop_table("ingest_policies")
    with op.batch_alter_table("dicom_nodes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dicom_nodes_institution_id"))

    op.drop_table("dicom_nodes")
    op.drop_table("orphan_candidates")
    with op.batch_alter_table("device_quotas", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_quotas_institution_id"))

    op.drop_table("device_quotas")
