"""roles, declared schema, split secret, validation set, exact metrics

Revision ID: b7d2c1e0a9f3
Revises: f4f40aead129
Create Date: 2026-12-07 01:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "b7d2c1e0a9f3"
down_revision: str | None = "f4f40aead129"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    # Keys that existed before roles were their tenant's only keys: they become owners.
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("role", sa.String(length=16), nullable=False, server_default="owner")
        )
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("num_test_clients", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("data_schema", JSON, nullable=True))
        batch_op.add_column(sa.Column("split_secret", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("validation_dataset_id", sa.String(length=40), nullable=True)
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_datasets_validation_dataset_id_datasets"),
            "datasets",
            ["validation_dataset_id"],
            ["id"],
        )
    # Datasets registered before get a secret of their own for their federated partitions.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "UPDATE datasets SET split_secret = md5(random()::text || id) "
            "|| md5(random()::text || clock_timestamp()::text)"
        )
    else:
        op.execute("UPDATE datasets SET split_secret = lower(hex(randomblob(32)))")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("exact_metrics", JSON, nullable=True))
        batch_op.add_column(sa.Column("receipt", JSON, nullable=True))
    # Metrics stored before were exact figures of protected rows: from now on they are the
    # owner's alone (GET /v1/jobs/{id}/metrics/exact), and analysts see none for old jobs.
    build = "jsonb_build_object" if op.get_bind().dialect.name == "postgresql" else "json_object"
    op.execute(
        f"UPDATE jobs SET exact_metrics = {build}('metrics', metrics, 'history', "
        "metrics_history), metrics = NULL, metrics_history = NULL WHERE metrics IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("receipt")
        batch_op.drop_column("exact_metrics")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_datasets_validation_dataset_id_datasets"), type_="foreignkey"
        )
        batch_op.drop_column("validation_dataset_id")
        batch_op.drop_column("split_secret")
        batch_op.drop_column("data_schema")
        batch_op.drop_column("num_test_clients")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("role")
