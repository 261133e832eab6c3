"""SQLAlchemy ORM models: the schema of the tagger database.

The schema itself is created by the hand-written Alembic migrations in
``migrations/versions``; these classes must stay in step with them (a test runs
``alembic.autogenerate.compare_metadata`` against a migrated database).
See :mod:`tagger.store` and ``docs/database.md`` for what each table means.

Conventions, chosen so that people can read the file with the ``sqlite3`` shell:

* timestamps are UTC, stored by SQLAlchemy as ISO text (``2025-01-31 12:00:00.123456``),
  so ``datetime(col, 'localtime')`` and string comparison both work;
* ``tracks.mtime`` is the file's own float epoch mtime (``datetime(mtime, 'unixepoch')``);
* JSON values are plain ``TEXT`` columns holding JSON (use ``json_extract`` / ``json_each``);
* booleans are ``0`` / ``1``;
* status / kind / state values are plain strings, documented below, not CHECK constraints,
  so that adding a value never needs a table rebuild;
* paths are ``TEXT`` when the file name is UTF-8 (nearly always) and a ``BLOB`` of the name's
  exact bytes when it is not (``caf\\xe9.mp3`` from an old Windows share): see
  :mod:`tagger.paths`. Messages (``last_error``, ``reason``) show such bytes as ``\\xNN``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .. import paths

# Track.status values.
TRACK_PENDING = "pending"  # seen, not classified yet (or changed since)
TRACK_CLASSIFIED = "classified"  # a prediction exists, tags not written (yet)
TRACK_TAGGED = "tagged"  # genre tags written to the file
TRACK_KEPT = "kept"  # classified, but the policy kept the file's existing tags
TRACK_UNTAGGED = "untagged"  # classified, no genre written: low confidence or none of the model's (last_error says which)
TRACK_FAILED = "failed"  # decoding / classifying / tagging failed, see last_error
TRACK_REMOVED = "removed"  # deleted through tagger (or its delete job)
TRACK_MISSING = "missing"  # vanished from disk without tagger doing it
TRACK_STATUSES = (
    TRACK_PENDING,
    TRACK_CLASSIFIED,
    TRACK_TAGGED,
    TRACK_KEPT,
    TRACK_UNTAGGED,
    TRACK_FAILED,
    TRACK_REMOVED,
    TRACK_MISSING,
)

# Track.tag_settings of a file whose genre was put back by `tagger restore`: settled under
# any settings (a later scan leaves it alone unless the file changes or --force says so).
TAG_SETTINGS_RESTORED = "restored"

# Job.kind and Job.state values.
JOB_KINDS = ("classify", "move", "delete", "rescan")
JOB_QUEUED = "queued"
JOB_CLAIMED = "claimed"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_STATES = (JOB_QUEUED, JOB_CLAIMED, JOB_DONE, JOB_FAILED)
JOB_LIVE_STATES = (JOB_QUEUED, JOB_CLAIMED)

# Deterministic constraint / index names, so migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Naive UTC now: SQLite has no time zones, so every stored timestamp is UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


class JSONText(TypeDecorator[Any]):
    """JSON stored in a TEXT column (not SQLAlchemy's JSON type, whose DDL type name
    ``JSON`` gets NUMERIC affinity in SQLite). Compact, key order preserved."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        return json.loads(value)


class FsPath(TypeDecorator[str]):
    """A file path, kept exactly: TEXT for a UTF-8 name, a BLOB of its bytes otherwise.

    SQLite cannot store the lone surrogates Python uses for undecodable bytes as TEXT;
    a column declared TEXT still holds a BLOB as is, and a BLOB never equals a TEXT, so
    ``unique`` and ``=`` keep working. Comparisons and ``IN`` with a path bind through
    this type too.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | bytes | None:
        return None if value is None else paths.to_db(value)

    def process_result_value(self, value: str | bytes | None, dialect: Dialect) -> str | None:
        return None if value is None else paths.from_db(value)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any]:
        # One cheap call per row: ``known_files`` reads every path of the library.
        fsdecode = os.fsdecode

        def process(value: Any) -> Any:
            return fsdecode(value) if value.__class__ is bytes else value

        return process


class Message(TypeDecorator[str]):
    """Free text that may quote a path: undecodable bytes are stored as ``\\xNN``."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else paths.display(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Track(Base):
    """One audio file, keyed by absolute path; what the scanner compares against."""

    __tablename__ = "tracks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(FsPath, unique=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime: Mapped[float] = mapped_column(Float)
    duration: Mapped[float | None] = mapped_column(Float)
    format: Mapped[str | None] = mapped_column(String(16))
    content_hash: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=TRACK_PENDING, index=True)
    last_error: Mapped[str | None] = mapped_column(Message)
    # Hash of the [tags] settings the file's genre was last decided under; NULL when not
    # settled (a dry run, a failed tag write): a scan applies other settings, or these
    # again, from the stored prediction without classifying the file again.
    tag_settings: Mapped[str | None] = mapped_column(String(16))
    first_seen: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_scanned: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)  # facts changed

    def __repr__(self) -> str:
        return f"Track(id={self.id!r}, path={self.path!r}, status={self.status!r})"


class Model(Base):
    """A trained classifier, identified by the sha256 of its weights file."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(Text)
    labels: Mapped[list[str]] = mapped_column(JSONText)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONText)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"Model(id={self.id!r}, name={self.name!r}, sha256={self.sha256[:12]!r})"


class Prediction(Base):
    """The latest prediction of one model for one track (upserted, no history)."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("track_id", "model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    track_id: Mapped[int] = mapped_column(ForeignKey("tracks.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSONText)
    genres: Mapped[list[str]] = mapped_column(JSONText)
    top_genre: Mapped[str] = mapped_column(Text)
    confidence: Mapped[float] = mapped_column(Float)
    windows: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    def __repr__(self) -> str:
        return (
            f"Prediction(track_id={self.track_id!r}, model_id={self.model_id!r}, "
            f"top_genre={self.top_genre!r}, confidence={self.confidence:.3f})"
        )


class Embedding(Base):
    """One model's embedding of one track: its pooled features before the genre layer,
    averaged over the track's windows; ``dim`` little-endian float16 values in ``vector``.
    Replaced when the track is classified again by that model (see ``tagger.store.embeddings``)."""

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("track_id", "model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    track_id: Mapped[int] = mapped_column(ForeignKey("tracks.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    windows: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"Embedding(track_id={self.track_id!r}, model_id={self.model_id!r}, dim={self.dim!r})"


class TagWrite(Base):
    """Audit log of genre-tag changes to a file (history kept; enables restore)."""

    __tablename__ = "tag_writes"
    __table_args__ = (Index("ix_tag_writes_track_id", "track_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    track_id: Mapped[int] = mapped_column(ForeignKey("tracks.id", ondelete="CASCADE"))
    written_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    policy: Mapped[str] = mapped_column(String(32))
    genres_before: Mapped[list[str]] = mapped_column(JSONText)
    genres_after: Mapped[list[str]] = mapped_column(JSONText)
    # The genre and marker fields exactly as the file stored them before this write
    # (tagger.tags snapshot), so restore gives back "(17)" rather than "Rock".
    raw_before: Mapped[dict[str, Any] | None] = mapped_column(JSONText)
    reason: Mapped[str | None] = mapped_column(Message)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    restored: Mapped[bool] = mapped_column(Boolean, default=False)
    restored_at: Mapped[datetime | None] = mapped_column(DateTime)

    def __repr__(self) -> str:
        return (
            f"TagWrite(id={self.id!r}, track_id={self.track_id!r}, "
            f"{self.genres_before!r} -> {self.genres_after!r}, dry_run={self.dry_run!r})"
        )


class Job(Base):
    """Durable daemon work item; at most one live (queued/claimed) job per path+kind."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_not_before", "state", "not_before"),
        Index(
            "uq_jobs_live_path_kind",
            "path",
            "kind",
            unique=True,
            sqlite_where=text("state IN ('queued', 'claimed')"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(FsPath)
    kind: Mapped[str] = mapped_column(String(16))
    dest_path: Mapped[str | None] = mapped_column(FsPath)
    state: Mapped[str] = mapped_column(String(16), default=JOB_QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Message)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    def __repr__(self) -> str:
        return (
            f"Job(id={self.id!r}, kind={self.kind!r}, path={self.path!r}, "
            f"state={self.state!r}, attempts={self.attempts!r})"
        )
