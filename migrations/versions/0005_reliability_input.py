"""mask coverage of uploaded files

Revision ID: 0003_reliability_input
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_reliability_input"
down_revision = "0003_reliability_faults"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("mask_coverage", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.drop_column("mask_coverage")
