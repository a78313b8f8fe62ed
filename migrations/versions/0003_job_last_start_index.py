"""job index for the fair lease's last start per tenant

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 18:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.create_index(
            "ix_job_tenant_id_kind_started_at", ["tenant_id", "kind", "started_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_tenant_id_kind_started_at")
