"""Repository functions for tracks, models, predictions and tag writes.

Plain functions over a :class:`~sqlalchemy.orm.Session` (get one from ``Database.session()``);
they flush but never commit, so a caller can group several into one transaction.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, or_, select, update
from sqlalchemy.orm import Session

from .models import (
    TAG_SETTINGS_RESTORED,
    TRACK_CLASSIFIED,
    TRACK_FAILED,
    TRACK_KEPT,
    TRACK_MISSING,
    TRACK_PENDING,
    TRACK_REMOVED,
    TRACK_STATUSES,
    TRACK_TAGGED,
    TRACK_UNTAGGED,
    Model,
    Prediction,
    TagWrite,
    Track,
    utcnow,
)

_tracks = Track.__table__


def _check_abs(path: str) -> str:
    # Paths are the identity of a track; relative ones would depend on the cwd.
    if not os.path.isabs(path):
        raise ValueError(f"track paths must be absolute: {path!r}")
    return path


def _check_status(status: str) -> str:
    if status not in TRACK_STATUSES:
        raise ValueError(f"unknown track status {status!r} (one of {', '.join(TRACK_STATUSES)})")
    return status


# --------------------------------------------------------------------------- tracks


def _facts(track: Track) -> tuple[object, ...]:
    return (track.size, track.mtime, track.status, track.duration, track.format, track.content_hash)


def get_track(session: Session, path: str) -> Track | None:
    return session.scalars(select(Track).where(Track.path == path)).one_or_none()


def upsert_track(
    session: Session,
    path: str,
    *,
    size: int,
    mtime: float,
    duration: float | None = None,
    format: str | None = None,
    content_hash: str | None = None,
    status: str | None = None,
    now: datetime | None = None,
) -> Track:
    """Insert or refresh a track after the scanner looked at it.

    A changed file (size or mtime differ) or one that came back after being missing/removed
    goes back to ``pending`` (its old hash and error no longer apply), unless ``status`` is
    given. ``duration``/``format``/``content_hash`` given as None keep their stored value.
    """
    _check_abs(path)
    if status is not None:
        _check_status(status)
    now = now or utcnow()
    track = get_track(session, path)
    if track is None:
        track = Track(
            path=path,
            size=int(size),
            mtime=float(mtime),
            duration=duration,
            format=format,
            content_hash=content_hash,
            status=status or TRACK_PENDING,
            first_seen=now,
            last_scanned=now,
            updated_at=now,
        )
        session.add(track)
        session.flush()
        return track
    before = _facts(track)
    changed = track.size != int(size) or track.mtime != float(mtime)
    if changed:
        track.size = int(size)
        track.mtime = float(mtime)
        track.content_hash = None
        track.last_error = None
    if status is not None:
        track.status = status
    elif changed or track.status in (TRACK_MISSING, TRACK_REMOVED):
        track.status = TRACK_PENDING
    if duration is not None:
        track.duration = duration
    if format is not None:
        track.format = format
    if content_hash is not None:
        track.content_hash = content_hash
    track.last_scanned = now
    if _facts(track) != before:  # updated_at tracks changes of facts, not mere rescans
        track.updated_at = now
    session.flush()
    return track


def known_files(session: Session) -> dict[str, tuple[int, float, str]]:
    """``{path: (size, mtime, status)}`` for every track, for the scanner's change check.

    One Core SELECT of four columns, no ORM objects: ~100k rows in a fraction of a second.
    """
    rows = session.connection().execute(
        select(_tracks.c.path, _tracks.c.size, _tracks.c.mtime, _tracks.c.status)
    )
    return {path: (size, mtime, status) for path, size, mtime, status in rows}


def unsettled(session: Session, settings: str) -> set[str]:
    """Paths of classified, tagged and kept tracks whose genre was not decided under
    ``settings`` (a ``tag_settings`` hash): other settings, a dry run, a failed tag write.
    Restored tracks are settled under any settings.

    Filtered inside SQLite, so the usual answer (none) costs one pass over the table
    and no Python objects.
    """
    settled = _tracks.c.tag_settings.in_((settings, TAG_SETTINGS_RESTORED))
    rows = session.connection().execute(
        select(_tracks.c.path).where(
            _tracks.c.status.in_((TRACK_CLASSIFIED, TRACK_TAGGED, TRACK_KEPT, TRACK_UNTAGGED)),
            or_(_tracks.c.tag_settings.is_(None), ~settled),
        )
    )
    return set(rows.scalars())


def set_tag_settings(session: Session, path: str, settings: str | None) -> None:
    """Record the ``[tags]`` settings hash the file's genre was decided under (None: not settled)."""
    session.connection().execute(update(_tracks).where(_tracks.c.path == path).values(tag_settings=settings))


def mark_scanned(session: Session, paths: Iterable[str], *, now: datetime | None = None) -> None:
    """Bump ``last_scanned`` for unchanged files in one executemany UPDATE."""
    params = [{"p": p} for p in paths]
    if not params:
        return
    session.connection().execute(
        update(_tracks)
        .where(_tracks.c.path == bindparam("p"))
        .values(last_scanned=now or utcnow()),
        params,
    )


def set_status(
    session: Session, path: str, status: str, *, error: str | None = None
) -> Track | None:
    """Set a track's status (and ``last_error``, cleared unless given); None if unknown."""
    _check_status(status)
    track = get_track(session, path)
    if track is None:
        return None
    track.status = status
    track.last_error = error
    track.updated_at = utcnow()
    session.flush()
    return track


def mark_failed(session: Session, path: str, error: str) -> Track:
    """Record that processing ``path`` failed; creates the track if the scanner never got to
    it (size/mtime from ``os.stat`` when possible, else 0 so the next scan retries it)."""
    track = get_track(session, path)
    if track is None:
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime
        except OSError:
            size, mtime = 0, 0.0
        track = upsert_track(session, path, size=size, mtime=mtime, status=TRACK_FAILED)
    track.status = TRACK_FAILED
    track.last_error = error
    track.updated_at = utcnow()
    session.flush()
    return track


def mark_removed(session: Session, path: str) -> bool:
    """The file was deleted through tagger; its history stays. False if unknown."""
    return set_status(session, path, TRACK_REMOVED) is not None


def mark_missing(session: Session, paths: Iterable[str]) -> int:
    """Files that vanished from disk without tagger deleting them; returns rows changed."""
    params = [{"p": p} for p in paths]
    if not params:
        return 0
    result = session.connection().execute(
        update(_tracks)
        .where(_tracks.c.path == bindparam("p"), _tracks.c.status != TRACK_REMOVED)
        .values(status=TRACK_MISSING, updated_at=utcnow()),
        params,
    )
    return int(result.rowcount or 0)


def move_track(session: Session, old: str, new: str) -> Track | None:
    """Re-key a track after a move, keeping its predictions and tag history.

    If a row for ``new`` already exists (the scanner saw the new file first) it is deleted
    (with its own predictions / tag writes) in favour of the older row. None if ``old`` is
    unknown.
    """
    _check_abs(new)
    track = get_track(session, old)
    if track is None:
        return None
    if old == new:
        return track
    session.execute(delete(Track).where(Track.path == new))
    track.path = new
    if track.status in (TRACK_MISSING, TRACK_REMOVED):
        track.status = TRACK_PENDING
    track.updated_at = utcnow()
    session.flush()
    return track


# --------------------------------------------------------------------------- models


def ensure_model(
    session: Session,
    sha256: str,
    name: str,
    labels: Sequence[str],
    metrics: Mapping[str, Any] | None = None,
) -> int:
    """Id of the model with these weights, registering it on first use."""
    model_id = session.scalar(select(Model.id).where(Model.sha256 == sha256))
    if model_id is not None:
        return model_id
    model = Model(
        sha256=sha256,
        name=name,
        labels=[str(x) for x in labels],
        metrics=dict(metrics) if metrics is not None else None,
    )
    session.add(model)
    session.flush()
    return model.id


# --------------------------------------------------------------------------- predictions


def record_prediction(
    session: Session,
    track_id: int,
    model_id: int,
    probs: Mapping[str, float],
    chosen: Sequence[str],
    windows: int,
    *,
    now: datetime | None = None,
) -> Prediction:
    """Store the latest prediction of ``model_id`` for ``track_id`` (replacing an older one).

    Values are coerced to plain str/float/int, so numpy scalars are fine. Does not change the
    track's status: the caller decides between classified/tagged/kept.
    """
    if not probs:
        raise ValueError("probabilities must not be empty")
    clean = {str(k): float(v) for k, v in probs.items()}
    top = max(clean, key=clean.__getitem__)
    pred = session.scalars(
        select(Prediction).where(Prediction.track_id == track_id, Prediction.model_id == model_id)
    ).one_or_none()
    if pred is None:
        pred = Prediction(track_id=track_id, model_id=model_id)
        session.add(pred)
    pred.probabilities = clean
    pred.genres = [str(g) for g in chosen]
    pred.top_genre = top
    pred.confidence = clean[top]
    pred.windows = int(windows)
    pred.created_at = now or utcnow()
    session.flush()
    return pred


def latest_prediction(
    session: Session, track_id: int, model_id: int | None = None
) -> Prediction | None:
    """The newest prediction for a track (of one model, or of any)."""
    stmt = select(Prediction).where(Prediction.track_id == track_id)
    if model_id is not None:
        stmt = stmt.where(Prediction.model_id == model_id)
    stmt = stmt.order_by(Prediction.created_at.desc(), Prediction.id.desc()).limit(1)
    return session.scalars(stmt).first()


# --------------------------------------------------------------------------- tag writes


def record_tag_write(
    session: Session,
    track_id: int,
    *,
    policy: str,
    before: Sequence[str],
    after: Sequence[str],
    raw_before: Mapping[str, Any] | None = None,
    reason: str | None = None,
    model_id: int | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> TagWrite:
    """Log a genre-tag change (or a dry-run's would-be change); the log is what restore uses.

    ``raw_before`` is the genre and marker fields exactly as the file stored them
    (``tagger.tags.GenreState.raw``), which restore writes back.
    """
    tw = TagWrite(
        track_id=track_id,
        written_at=now or utcnow(),
        policy=policy,
        genres_before=[str(g) for g in before],
        genres_after=[str(g) for g in after],
        raw_before=dict(raw_before) if raw_before is not None else None,
        reason=reason,
        model_id=model_id,
        dry_run=dry_run,
        restored=False,
    )
    session.add(tw)
    session.flush()
    return tw


def delete_tag_write(session: Session, write_id: int) -> None:
    """Drop a write-ahead record whose file write failed (the file was not changed)."""
    tw = session.get(TagWrite, write_id)
    if tw is not None:
        session.delete(tw)


def last_tag_write(
    session: Session, track_id: int, *, include_dry_run: bool = False
) -> TagWrite | None:
    """The newest tag write for a track (real writes only, by default)."""
    stmt = select(TagWrite).where(TagWrite.track_id == track_id)
    if not include_dry_run:
        stmt = stmt.where(TagWrite.dry_run.is_(False))
    return session.scalars(stmt.order_by(TagWrite.id.desc()).limit(1)).first()


def open_writes(session: Session, track_id: int) -> list[TagWrite]:
    """A track's real writes not yet undone by a restore, oldest first."""
    stmt = select(TagWrite).where(
        TagWrite.track_id == track_id,
        TagWrite.dry_run.is_(False),
        TagWrite.restored.is_(False),
        TagWrite.policy != "restore",
    )
    return list(session.scalars(stmt.order_by(TagWrite.id)))


def mark_restored(session: Session, tag_write_id: int, *, now: datetime | None = None) -> None:
    """The file's genres were put back to this write's ``genres_before``."""
    session.execute(
        update(TagWrite)
        .where(TagWrite.id == tag_write_id)
        .values(restored=True, restored_at=now or utcnow())
    )
