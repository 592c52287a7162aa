"""The initial schema: users, tokens, entries, audit, triples, relations, service_state.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("created", TS, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("revoked", TS, nullable=True),
    )
    op.create_table(
        "entries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("updated", TS, nullable=False),
        sa.Column("request_text", sa.Text, nullable=False),
        sa.Column("triples", sa.JSON, nullable=False),
        sa.Column("kg_changes", sa.JSON, nullable=False),
        sa.Column("requests", sa.JSON, nullable=False),
        sa.Column("method", sa.String(50), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("state", sa.String(20), nullable=False, index=True),
        sa.Column("seq", sa.Integer, nullable=True),
        sa.Column("artefact", sa.Text, nullable=True),
        sa.Column("artefact_sha256", sa.String(64), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ts", TS, nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=True),
        sa.Column("entry_id", sa.Integer, sa.ForeignKey("entries.id"), nullable=True),
        sa.Column("action", sa.String(50), nullable=False),
        sa.Column("from_state", sa.String(20), nullable=True),
        sa.Column("to_state", sa.String(20), nullable=True),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_table(
        "triples",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("head", sa.String(500), nullable=False, index=True),
        sa.Column("relation", sa.String(200), nullable=False),
        sa.Column("tail", sa.String(500), nullable=False, index=True),
        sa.UniqueConstraint("head", "relation", "tail", name="uq_triple"),
    )
    op.create_table(
        "relations",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("reverse", sa.String(200), nullable=False),
        sa.Column("multihop", sa.JSON, nullable=False),
        sa.Column("templates", sa.JSON, nullable=False),
    )
    op.create_table(
        "service_state",
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for name in ("service_state", "relations", "triples", "audit", "entries", "tokens", "users"):
        op.drop_table(name)
