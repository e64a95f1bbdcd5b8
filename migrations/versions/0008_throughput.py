"""batch progress counters and usage totals kept by triggers on jobs, batch dispatch stamp, calibrations

Revision ID: 0008_throughput
Revises: 0003_catalog
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from core import progress

revision = "0008_throughput"
down_revision = "0003_catalog"
branch_labels = None
depends_on = None

COUNTERS = ("queued", "running", "succeeded", "failed", "canceled", "expired")


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        for status in COUNTERS:
            batch_op.add_column(sa.Column(f"{status}_count", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("dispatched_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_tenant_batch_status", ["tenant_id", "batch_id", "status"], unique=False)
        batch_op.drop_index("ix_jobs_tenant_id")
    op.create_table(
        "calibrations",
        sa.Column("profile", sa.String(length=100), nullable=False),
        sa.Column("device", sa.String(length=200), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("pixel_budget", sa.BigInteger(), nullable=False),
        sa.Column("images_per_s", sa.Float(), nullable=False),
        sa.Column("trials", sa.JSON(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=False),
        sa.Column("measured_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("profile", "device"),
    )
    op.create_table(
        "batch_usage",
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("device", sa.String(length=16), nullable=False),
        sa.Column("megapixels", sa.Float(), nullable=False),
        sa.Column("steps", sa.BigInteger(), nullable=False),
        sa.Column("compute_seconds", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"]),
        sa.PrimaryKeyConstraint("batch_id", "device"),
    )
    # Existing batches start from their job rows; from here on the triggers move the counters. Last,
    # so that no table rebuild above (SQLite batch mode) can drop or break them.
    for status in COUNTERS:
        op.execute(f"UPDATE batches SET {status}_count = (SELECT count(*) FROM jobs "
                   f"WHERE jobs.batch_id = batches.id AND jobs.status = '{status}')")
    op.execute("INSERT INTO batch_usage (batch_id, device, megapixels, steps, compute_seconds) "
               "SELECT batch_id, coalesce(usage_device, ''), sum(usage_megapixels), sum(coalesce(usage_steps, 0)), "
               "sum(coalesce(usage_compute_seconds, 0)) FROM jobs "
               "WHERE batch_id IS NOT NULL AND usage_megapixels IS NOT NULL "
               "GROUP BY batch_id, coalesce(usage_device, '')")
    progress.install(op.get_bind())


def downgrade() -> None:
    progress.uninstall(op.get_bind())
    op.drop_table("batch_usage")
    op.drop_table("calibrations")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_tenant_id", ["tenant_id"], unique=False)
        batch_op.drop_index("ix_jobs_tenant_batch_status")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("dispatched_at")
        for status in COUNTERS:
            batch_op.drop_column(f"{status}_count")
