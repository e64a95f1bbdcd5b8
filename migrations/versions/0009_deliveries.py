"""dashboard: indexes for the webhook deliveries page (an endpoint's log newest first; its counts
per status and last success read from an index)

Revision ID: 0009_deliveries
Revises: 0008_throughput
Create Date: 2026-11-28
"""

from alembic import op

revision = "0009_deliveries"
down_revision = "0008_throughput"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_deliveries_endpoint_created", ["endpoint_id", "created_at", "id"],
                              unique=False)
        batch_op.create_index("ix_webhook_deliveries_endpoint_status", ["endpoint_id", "status", "finished_at"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_endpoint_status")
        batch_op.drop_index("ix_webhook_deliveries_endpoint_created")
