"""experiments: a grid of training runs (job.experiment_id)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 18:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import service.db

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "experiment",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("dataset_id", sa.String(length=40), nullable=True),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("adapter_prefix", sa.String(length=200), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created_at", service.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["dataset.id"],
            name=op.f("fk_experiment_dataset_id_dataset"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenant.id"],
            name=op.f("fk_experiment_tenant_id_tenant"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiment")),
    )
    with op.batch_alter_table("experiment", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_experiment_tenant_id"), ["tenant_id"], unique=False)
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("experiment_id", sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f("ix_job_experiment_id"), ["experiment_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_job_experiment_id_experiment"),
            "experiment",
            ["experiment_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_job_experiment_id_experiment"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_job_experiment_id"))
        batch_op.drop_column("experiment_id")
    with op.batch_alter_table("experiment", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_experiment_tenant_id"))
    op.drop_table("experiment")
