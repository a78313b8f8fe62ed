"""job kind 'grid' (POST /grids)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 18:10:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_job_kind"), type_="check")
        batch_op.create_check_constraint(
            op.f("ck_job_kind"), "kind IN ('train', 'generate', 'ping', 'grid')"
        )


def downgrade() -> None:
    op.execute("DELETE FROM job WHERE kind = 'grid'")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_job_kind"), type_="check")
        batch_op.create_check_constraint(op.f("ck_job_kind"), "kind IN ('train', 'generate', 'ping')")
