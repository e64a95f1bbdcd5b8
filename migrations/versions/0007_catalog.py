"""catalog: per-status batch times, completion window, output retention, usage per job

Revision ID: 0003_catalog
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_catalog"
down_revision = "0003_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("started_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("canceled_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("completion_window", sa.Integer(), nullable=False, server_default="86400"))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("output_ttl", sa.Integer(), nullable=False, server_default="604800"))
        batch_op.add_column(sa.Column("outputs_deleted_at", sa.DateTime(), nullable=True))
        batch_op.create_index("ix_batches_expires_at", ["expires_at"], unique=False)
        batch_op.create_index("ix_batches_finished_at", ["finished_at"], unique=False)
    # The server defaults only fill the rows that exist now; the ORM sets both on every new batch.
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.alter_column("completion_window", server_default=None)
        batch_op.alter_column("output_ttl", server_default=None)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("usage_megapixels", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("usage_steps", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("usage_compute_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("usage_device", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in ("usage_device", "usage_compute_seconds", "usage_steps", "usage_megapixels"):
            batch_op.drop_column(column)
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index("ix_batches_finished_at")
        batch_op.drop_index("ix_batches_expires_at")
        for column in ("outputs_deleted_at", "output_ttl", "expires_at", "completion_window", "canceled_at",
                       "started_at"):
            batch_op.drop_column(column)
