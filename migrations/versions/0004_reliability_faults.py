"""retry accounting, error codes, progress, reconciler runs

Revision ID: 0003_reliability_faults
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_reliability_faults"
down_revision = "0003_dashboard"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claims", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("outage_since", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("error_code", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("retryable", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("progress", sa.Float(), nullable=False, server_default="0"))
    op.execute("UPDATE jobs SET claims = attempts")
    op.create_table(
        "reconciler_runs",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("ran_at", sa.DateTime(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("reconciler_runs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in ("progress", "retryable", "error_code", "outage_since", "claims"):
            batch_op.drop_column(column)
