"""webhook endpoints, outbox, delivery log; URL inputs waiting to be fetched

Revision ID: 0003_webhooks
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_webhooks"
down_revision = "0003_reliability_input"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("webhook_callbacks",
    sa.Column("resource_id", sa.String(length=40), nullable=False),
    sa.Column("tenant_id", sa.String(length=64), nullable=False),
    sa.Column("url", sa.String(length=2000), nullable=False),
    sa.Column("events", sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ),
    sa.PrimaryKeyConstraint("resource_id")
    )
    with op.batch_alter_table("webhook_callbacks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_callbacks_tenant_id"), ["tenant_id"], unique=False)

    op.create_table("webhook_endpoints",
    sa.Column("id", sa.String(length=40), nullable=False),
    sa.Column("tenant_id", sa.String(length=64), nullable=False),
    sa.Column("url", sa.String(length=2000), nullable=False),
    sa.Column("events", sa.JSON(), nullable=False),
    sa.Column("description", sa.String(length=500), nullable=False),
    sa.Column("secret", sa.String(length=64), nullable=False),
    sa.Column("previous_secret", sa.String(length=64), nullable=True),
    sa.Column("previous_secret_until", sa.DateTime(), nullable=True),
    sa.Column("enabled", sa.Boolean(), nullable=False),
    sa.Column("disabled_reason", sa.Text(), nullable=True),
    sa.Column("failing_since", sa.DateTime(), nullable=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_endpoints_tenant_id"), ["tenant_id"], unique=False)

    op.create_table("webhook_events",
    sa.Column("id", sa.String(length=40), nullable=False),
    sa.Column("tenant_id", sa.String(length=64), nullable=False),
    sa.Column("type", sa.String(length=40), nullable=False),
    sa.Column("resource_id", sa.String(length=40), nullable=False),
    sa.Column("sequence", sa.Integer(), nullable=False),
    sa.Column("payload", sa.JSON(), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_events_resource", ["resource_id", "type", "sequence"], unique=False)
        batch_op.create_index(batch_op.f("ix_webhook_events_tenant_id"), ["tenant_id"], unique=False)

    op.create_table("webhook_signing_secrets",
    sa.Column("tenant_id", sa.String(length=64), nullable=False),
    sa.Column("secret", sa.String(length=64), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ),
    sa.PrimaryKeyConstraint("tenant_id")
    )
    op.create_table("webhook_deliveries",
    sa.Column("id", sa.String(length=40), nullable=False),
    sa.Column("event_id", sa.String(length=40), nullable=False),
    sa.Column("tenant_id", sa.String(length=64), nullable=False),
    sa.Column("endpoint_id", sa.String(length=40), nullable=True),
    sa.Column("callback_url", sa.String(length=2000), nullable=True),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
    sa.Column("sending_until", sa.DateTime(), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("finished_at", sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(["endpoint_id"], ["webhook_endpoints.id"], ondelete="CASCADE"),
    sa.ForeignKeyConstraint(["event_id"], ["webhook_events.id"], ),
    sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_deliveries_due", ["status", "next_attempt_at"], unique=False)
        batch_op.create_index("ix_webhook_deliveries_endpoint", ["endpoint_id", "id"], unique=False)
        batch_op.create_index("ix_webhook_deliveries_sending", ["endpoint_id", "sending_until"], unique=False)

    op.create_table("input_fetches",
    sa.Column("job_id", sa.String(length=40), nullable=False),
    sa.Column("field", sa.String(length=16), nullable=False),
    sa.Column("tenant_id", sa.String(length=64), nullable=False),
    sa.Column("batch_id", sa.String(length=40), nullable=True),
    sa.Column("url", sa.String(length=2000), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
    sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ),
    sa.PrimaryKeyConstraint("job_id", "field")
    )
    with op.batch_alter_table("input_fetches", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_input_fetches_batch_id"), ["batch_id"], unique=False)
        batch_op.create_index("ix_input_fetches_due", ["next_attempt_at"], unique=False)

    op.create_table("webhook_attempts",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("delivery_id", sa.String(length=40), nullable=False),
    sa.Column("at", sa.DateTime(), nullable=False),
    sa.Column("status_code", sa.Integer(), nullable=True),
    sa.Column("latency_ms", sa.Integer(), nullable=False),
    sa.Column("response", sa.Text(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(["delivery_id"], ["webhook_deliveries.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("webhook_attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_attempts_delivery_id"), ["delivery_id"], unique=False)



def downgrade() -> None:
    with op.batch_alter_table("webhook_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_attempts_delivery_id"))

    op.drop_table("webhook_attempts")
    with op.batch_alter_table("input_fetches", schema=None) as batch_op:
        batch_op.drop_index("ix_input_fetches_due")
        batch_op.drop_index(batch_op.f("ix_input_fetches_batch_id"))

    op.drop_table("input_fetches")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_sending")
        batch_op.drop_index("ix_webhook_deliveries_endpoint")
        batch_op.drop_index("ix_webhook_deliveries_due")

    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_signing_secrets")
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_events_tenant_id"))
        batch_op.drop_index("ix_webhook_events_resource")

    op.drop_table("webhook_events")
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_endpoints_tenant_id"))

    op.drop_table("webhook_endpoints")
    with op.batch_alter_table("webhook_callbacks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_callbacks_tenant_id"))

    op.drop_table("webhook_callbacks")
