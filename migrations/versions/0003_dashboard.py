"""dashboard: operator keys, queue pauses, worker samples, indexes for the overview and batch listing

Revision ID: 0003_dashboard
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_dashboard"
down_revision = "0002"
branch_labels = None
depends_on = None

JOB_INDEXES = {
    "ix_jobs_status_lane_created": ["status", "lane", "created_at"],
    "ix_jobs_status_model_created": ["status", "model", "created_at"],
    "ix_jobs_finished": ["finished_at", "status"],
    "ix_jobs_batch_finished": ["batch_id", "finished_at"],
}
BATCH_INDEXES = {
    "ix_batches_tenant_created": ["tenant_id", "created_at"],
    "ix_batches_created": ["created_at"],
}


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("operator", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "queue_pauses",
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("paused_by", sa.String(length=64), nullable=False),
        sa.Column("paused_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "name"),
    )
    op.create_table(
        "worker_samples",
        sa.Column("worker", sa.String(length=200), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("rss_bytes", sa.BigInteger(), nullable=True),
        sa.Column("gpu_memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("images", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("worker", "at"),
    )
    op.create_index("ix_worker_samples_at", "worker_samples", ["at"], unique=False)
    for name, columns in JOB_INDEXES.items():
        op.create_index(name, "jobs", columns, unique=False)
    for name, columns in BATCH_INDEXES.items():
        op.create_index(name, "batches", columns, unique=False)


def downgrade() -> None:
    for name in BATCH_INDEXES:
        op.drop_index(name, table_name="batches")
    for name in JOB_INDEXES:
        op.drop_index(name, table_name="jobs")
    op.drop_index("ix_worker_samples_at", table_name="worker_samples")
    op.drop_table("worker_samples")
    op.drop_table("queue_pauses")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("operator")
