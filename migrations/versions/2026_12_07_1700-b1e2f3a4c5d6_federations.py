"""federations, their nodes and tasks; datasets.federation_backing (issue #16).

A federation's backing dataset row is marked ``federation_backing`` (never listed, no files).

Revision ID: b1e2f3a4c5d6
Revises: a9d8e7f6c5b4
Create Date: 2026-12-07 17:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "b1e2f3a4c5d6"
down_revision: str | None = "a9d8e7f6c5b4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "federations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("data_schema", JSON, nullable=False),
        sa.Column("privacy_unit", sa.String(length=16), nullable=False),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_federations_dataset_id_datasets")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_federations_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federations")),
        sa.UniqueConstraint("dataset_id", name=op.f("uq_federations_dataset_id")),
    )
    with op.batch_alter_table("federations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_federations_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "federation_nodes",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("federation_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("enrolment_token_hash", sa.String(length=64), nullable=True),
        sa.Column("enrolment_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("credential_hash", sa.String(length=64), nullable=True),
        sa.Column("software_version", sa.String(length=64), nullable=True),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("schema_ok", sa.Boolean(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("check_message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["federation_id"],
            ["federations.id"],
            name=op.f("fk_federation_nodes_federation_id_federations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federation_nodes")),
        sa.UniqueConstraint("credential_hash", name=op.f("uq_federation_nodes_credential_hash")),
        sa.UniqueConstraint(
            "enrolment_token_hash", name=op.f("uq_federation_nodes_enrolment_token_hash")
        ),
    )
    with op.batch_alter_table("federation_nodes", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_federation_nodes_federation_id"), ["federation_id"], unique=False
        )

    op.create_table(
        "federation_tasks",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("node_id", sa.String(length=40), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("epsilon", sa.Float(), nullable=True),
        sa.Column("epsilon_total", sa.Float(), nullable=True),
        sa.Column("update_key", sa.String(length=200), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_federation_tasks_job_id_jobs")
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["federation_nodes.id"],
            name=op.f("fk_federation_tasks_node_id_federation_nodes"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federation_tasks")),
    )
    with op.batch_alter_table("federation_tasks", schema=None) as batch_op:
        batch_op.create_index("ix_federation_tasks_job_round", ["job_id", "round"], unique=False)
        batch_op.create_index(
            "ix_federation_tasks_node_status", ["node_id", "status"], unique=False
        )

    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("federation_backing", sa.Boolean(), server_default="false", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("federation_backing")

    with op.batch_alter_table("federation_tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_federation_tasks_node_status")
        batch_op.drop_index("ix_federation_tasks_job_round")

    op.drop_table("federation_tasks")
    with op.batch_alter_table("federation_nodes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_federation_nodes_federation_id"))

    op.drop_table("federation_nodes")
    with op.batch_alter_table("federations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_federations_tenant_id"))

    op.drop_table("federations")
