"""Exact restore and settled tag settings: tag_writes.raw_before, tracks.tag_settings,
and a track_genres view whose written_genres is only what tagger's write left in the file.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01

Hand-written: keep in step with tagger/store/models.py (tests/test_store.py compares them).

* ``tag_writes.raw_before``: the genre and marker fields exactly as the file stored them
  before the write (JSON), so ``restore`` gives back ``(17)``, padding, encodings and a
  missing tag block rather than mutagen's reading of them. NULL for older writes.
* ``tracks.tag_settings``: hash of the ``[tags]`` settings the file's genre was last
  decided under. NULL (every row after this upgrade) means "not settled": the next scan
  applies its settings from the stored prediction, reading the tags of those files once.
* ``track_genres.written_genres`` / ``written_at``: NULL once the latest write was undone
  by a restore (they used to show the restored value as if tagger had written it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_VIEW = """
CREATE VIEW track_genres AS
SELECT
    t.id            AS track_id,
    t.path          AS path,
    t.status        AS status,
    p.top_genre     AS top_genre,
    p.confidence    AS confidence,
    p.genres        AS predicted_genres,
    {written_genres} AS written_genres,
    {written_at} AS written_at,
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
# The genres tagger's latest write left in the file; NULL when a restore undid it.
_UNDONE = "w.restored OR w.policy = 'restore'"
VIEW_0002 = _VIEW.format(
    written_genres=f"CASE WHEN {_UNDONE} THEN NULL ELSE w.genres_after END",
    written_at=f"CASE WHEN {_UNDONE} THEN NULL ELSE w.written_at END",
)
VIEW_0001 = _VIEW.format(
    written_genres="CASE WHEN w.restored THEN w.genres_before ELSE w.genres_after END",
    written_at="CASE WHEN w.restored THEN w.restored_at ELSE w.written_at END",
)


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS track_genres")
    op.add_column("tracks", sa.Column("tag_settings", sa.String(length=16), nullable=True))
    op.add_column("tag_writes", sa.Column("raw_before", sa.Text(), nullable=True))
    op.execute(VIEW_0002)


def downgrade() -> None:
    # SQLite's own DROP COLUMN (3.35+, which tagger requires), not a batch rebuild: with
    # foreign keys on, dropping the old ``tracks`` table would cascade to every table
    # that refers to it and empty them.
    op.execute("DROP VIEW IF EXISTS track_genres")
    op.execute("ALTER TABLE tag_writes DROP COLUMN raw_before")
    op.execute("ALTER TABLE tracks DROP COLUMN tag_settings")
    op.execute(VIEW_0001)
