"""Concurrency slots: the cap on active studies is a primary key, so two services cannot pass it."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "active_slots",
        sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("study_id", sa.String(64), nullable=False, unique=True),
    )
    op.add_column("studies", sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("studies", sa.Column("planned", sa.Integer, nullable=False, server_default="0"))
    # Studies active before this migration hold a slot each ("pending" is now "launching").
    conn = op.get_bind()
    conn.execute(sa.text("UPDATE studies SET state = 'launching' WHERE state = 'pending'"))
    rows = conn.execute(sa.text("SELECT id FROM studies WHERE state IN ('launching', 'running', 'cancelling')"))
    for slot, (study_id,) in enumerate(rows.fetchall()):
        conn.execute(sa.text("INSERT INTO active_slots (slot, study_id) VALUES (:s, :i)"), {"s": slot, "i": study_id})


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("planned")
        batch.drop_column("cancel_requested")
    op.drop_table("active_slots")
