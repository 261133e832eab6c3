"""SQLite store: every scan, prediction, tag write and daemon job, in one file.

Open it with :func:`open_db` (creates the file and runs the Alembic migrations up to head),
then work inside ``with db.session() as s:`` using the functions re-exported here.
The database is a plain SQLite file in WAL mode, meant to be queried with ``sqlite3`` too;
``docs/database.md`` has a walk-through with example queries.

Tables (timestamps are UTC ISO text; JSON columns are TEXT holding JSON):

``tracks``       one row per audio file. ``path`` (absolute, unique), ``size``, ``mtime``
                 (float epoch), ``duration`` (s), ``format``, ``content_hash`` (optional),
                 ``status`` (pending / classified / tagged / kept / failed / removed /
                 missing), ``last_error``, ``tag_settings`` (hash of the [tags] settings the
                 genre was decided under; NULL: not settled), ``first_seen``,
                 ``last_scanned``, ``updated_at``.
``models``       one row per classifier weights file: ``sha256`` (unique), ``name``,
                 ``labels`` (JSON list), ``metrics`` (JSON object), ``created_at``.
``predictions``  the LATEST prediction per (track, model) -- unique (track_id, model_id),
                 replaced on re-classification, no history: ``probabilities`` (JSON object
                 genre -> p), ``genres`` (JSON list chosen), ``top_genre``, ``confidence``,
                 ``windows`` (number of audio windows averaged), ``created_at``.
``tag_writes``   history of genre-tag changes (kept forever): ``written_at``, ``policy``,
                 ``genres_before`` / ``genres_after`` (JSON lists), ``raw_before`` (the
                 fields exactly as stored, for restore), ``reason``, ``model_id``,
                 ``dry_run``, ``restored`` / ``restored_at``.
``embeddings``   one row per (track, model): ``dim`` float16 values in ``vector`` (the model's
                 pooled features before its genre layer, mean over windows), ``windows``,
                 ``created_at`` (see :mod:`tagger.store.embeddings`).
``jobs``         the daemon's durable queue: ``path``, ``kind`` (classify / move / delete /
                 rescan), ``dest_path``, ``state`` (queued / claimed / done / failed),
                 ``attempts``, ``not_before``, ``claimed_by`` (host:pid), ``claimed_at``,
                 ``heartbeat``, ``last_error``, ``created_at``, ``finished_at``.
                 One live (queued/claimed) job per (path, kind).

View ``track_genres``: one row per track with its latest prediction (any model), the genres
tagger's latest write left in the file (NULL once restored), the model's sha/name and
``last_scanned``.
"""

from __future__ import annotations

from .db import (
    DEFAULT_BUSY_TIMEOUT,
    Database,
    DatabaseLocked,
    SchemaTooNew,
    alembic_config,
    current,
    downgrade,
    head_revision,
    make_engine,
    migrations_dir,
    open_db,
    upgrade,
)
from .jobs import (
    claim,
    complete,
    enqueue,
    fail,
    heartbeat,
    purge_finished,
    queue_stats,
    release_stale,
)
from .models import (
    JOB_KINDS,
    JOB_STATES,
    TRACK_STATUSES,
    Base,
    Job,
    Model,
    Prediction,
    TagWrite,
    Track,
)
from .repo import (
    ensure_model,
    get_track,
    known_files,
    last_tag_write,
    latest_prediction,
    mark_failed,
    mark_missing,
    mark_removed,
    mark_restored,
    mark_scanned,
    move_track,
    record_prediction,
    record_tag_write,
    set_status,
    upsert_track,
)

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "JOB_KINDS",
    "JOB_STATES",
    "TRACK_STATUSES",
    "Base",
    "Database",
    "DatabaseLocked",
    "Job",
    "Model",
    "Prediction",
    "SchemaTooNew",
    "TagWrite",
    "Track",
    "alembic_config",
    "claim",
    "complete",
    "current",
    "downgrade",
    "enqueue",
    "ensure_model",
    "fail",
    "get_track",
    "head_revision",
    "heartbeat",
    "known_files",
    "last_tag_write",
    "latest_prediction",
    "make_engine",
    "mark_failed",
    "mark_missing",
    "mark_removed",
    "mark_restored",
    "mark_scanned",
    "migrations_dir",
    "move_track",
    "open_db",
    "purge_finished",
    "queue_stats",
    "record_prediction",
    "record_tag_write",
    "release_stale",
    "set_status",
    "upgrade",
    "upsert_track",
]
