"""Initial schema: tracks, models, predictions, tag_writes, jobs, view track_genres.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Hand-written: keep in step with tagger/store/models.py (tests/test_store.py compares them).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One row per track: its latest prediction (any model) and the genres tagger last left in
# the file (the "after" of the latest real write, or its "before" if that write was restored).
TRACK_GENRES_VIEW = """
CREATE VIEW track_genres AS
SELECT
    t.id            AS track_id,
    t.path          AS path,
    t.status        AS status,
    p.top_genre     AS top_genre,
    p.confidence    AS confidence,
    p.genres        AS predicted_genres,
    CASE WHEN w.restored THEN w.genres_before ELSE w.genres_after END AS written_genres,
    CASE WHEN w.restored THEN w.restored_at ELSE w.written_at END AS written_at,
    m.sha256        AS model_sha256,
    m.name          AS model_name,
    p.created_at    AS predicted_at,
    t.last_scanned  AS last_scanned,
    t.last_error    AS last_error
FROM tracks AS t
LEFT JOIN predictions AS p ON p.id = (
    SELECT p2.id FROM predictions AS p2
    WHERE p2.track_id = t.id
    ORDER BY p2.created_at DESC, p2.id DESC
    LIMIT 1
)
LEFT JOIN models AS m ON m.id = p.model_id
LEFT JOIN tag_writes AS w ON w.id = (
    SELECT w2.id FROM tag_writes AS w2
    WHERE w2.track_id = t.id AND w2.dry_run = 0
    ORDER BY w2.id DESC
    LIMIT 1
)
"""


def upgrade() -> None:
    op.create_table(
        "tracks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("mtime", sa.Float(), nullable=False),
        sa.Column("duration", sa.Float(), nullable=True),
        sa.Column("format", sa.String(length=16), nullable=True),
        sa.Column("content_hash", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("first_seen", sa.DateTime(), nullable=False),
        sa.Column("last_scanned", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tracks"),
        sa.UniqueConstraint("path", name="uq_tracks_path"),
    )
    op.create_index("ix_tracks_status", "tracks", ["status"])

    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("sha256", name="uq_models_sha256"),
    )

    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("track_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("probabilities", sa.Text(), nullable=False),
        sa.Column("genres", sa.Text(), nullable=False),
        sa.Column("top_genre", sa.Text(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_predictions"),
        sa.ForeignKeyConstraint(
            ["track_id"], ["tracks.id"], name="fk_predictions_track_id_tracks", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name="fk_predictions_model_id_models", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("track_id", "model_id", name="uq_predictions_track_id_model_id"),
    )
    op.create_index("ix_predictions_model_id", "predictions", ["model_id"])

    op.create_table(
        "tag_writes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("track_id", sa.Integer(), nullable=False),
        sa.Column("written_at", sa.DateTime(), nullable=False),
        sa.Column("policy", sa.String(length=32), nullable=False),
        sa.Column("genres_before", sa.Text(), nullable=False),
        sa.Column("genres_after", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("restored", sa.Boolean(), nullable=False),
        sa.Column("restored_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tag_writes"),
        sa.ForeignKeyConstraint(
            ["track_id"], ["tracks.id"], name="fk_tag_writes_track_id_tracks", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name="fk_tag_writes_model_id_models", ondelete="SET NULL"
        ),
    )
    op.create_index("ix_tag_writes_track_id", "tag_writes", ["track_id", "id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("dest_path", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(), nullable=False),
        sa.Column("claimed_by", sa.String(length=255), nullable=True),
        sa.Column("claimed_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_state_not_before", "jobs", ["state", "not_before"])
    op.create_index(
        "uq_jobs_live_path_kind",
        "jobs",
        ["path", "kind"],
        unique=True,
        sqlite_where=sa.text("state IN ('queued', 'claimed')"),
    )

    op.execute(TRACK_GENRES_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS track_genres")
    op.drop_index("uq_jobs_live_path_kind", table_name="jobs")
    op.drop_index("ix_jobs_state_not_before", table_name="jobs")
    op.drop_table("jobs")
    op.drop_index("ix_tag_writes_track_id", table_name="tag_writes")
    op.drop_table("tag_writes")
    op.drop_index("ix_predictions_model_id", table_name="predictions")
    op.drop_table("predictions")
    op.drop_table("models")
    op.drop_index("ix_tracks_status", table_name="tracks")
    op.drop_table("tracks")
