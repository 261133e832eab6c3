"""Embeddings: one row per track and model, the model's pooled features before its genre
layer (mean over the track's windows), for ``tagger learn`` and ``tagger similar``.

Revision ID: 0003
Revises: 0002
Create Date: 2025-02-15

Hand-written: keep in step with tagger/store/models.py (tests/test_store.py compares them).

A new table only: plain CREATE TABLE / DROP TABLE, no batch rebuild of an existing table
(with foreign keys on, rebuilding ``tracks`` would cascade-delete ``tag_writes`` rows).
``vector`` is ``dim`` little-endian float16 values (2 bytes each); ``dim`` is stored per
row because another model has another dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "embeddings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("track_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_embeddings"),
        sa.ForeignKeyConstraint(
            ["track_id"], ["tracks.id"], name="fk_embeddings_track_id_tracks", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name="fk_embeddings_model_id_models", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("track_id", "model_id", name="uq_embeddings_track_id_model_id"),
    )
    op.create_index("ix_embeddings_model_id", "embeddings", ["model_id"])


def downgrade() -> None:
    op.drop_index("ix_embeddings_model_id", table_name="embeddings")
    op.drop_table("embeddings")
