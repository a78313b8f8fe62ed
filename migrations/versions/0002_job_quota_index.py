"""job index for tenant quotas and the fair lease

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 15:10:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # (tenant_id, kind, status) also serves every lookup the (tenant_id, kind) index did.
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.create_index(
            "ix_job_tenant_id_kind_status", ["tenant_id", "kind", "status"], unique=False
        )
        batch_op.drop_index("ix_job_tenant_id_kind")


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.create_index("ix_job_tenant_id_kind", ["tenant_id", "kind"], unique=False)
        batch_op.drop_index("ix_job_tenant_id_kind_status")
