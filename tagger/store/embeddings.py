"""Embeddings in the database: one row per (track, model), compact float16 bytes.

A track's embedding is the model's pooled features before its genre layer, averaged
over the track's windows. It is written in the same transaction as the track's
prediction, so ``tagger learn`` (a head on the user's own genres) and ``tagger similar``
(nearest tracks) never decode audio that was already scanned. The dimension is stored
with every vector: another model has another one, and nothing here assumes it.

Like :mod:`tagger.store.repo`, these functions flush but never commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

import numpy as np
from sqlalchemy import bindparam, select
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.orm import Session

from .models import TRACK_FAILED, TRACK_MISSING, TRACK_REMOVED, Embedding, Model, Track, utcnow

_emb = Embedding.__table__
_tracks = Track.__table__
#: Little-endian float16: half the bytes of float32, and ample for cosine similarity and a
#: linear head (3 significant digits).
STORED = np.dtype("<f2")
_F16_MAX = float(np.finfo(np.float16).max)
#: Tracks whose file is gone or no longer decodes: their embedding describes nothing there.
GONE = (TRACK_REMOVED, TRACK_MISSING, TRACK_FAILED)


def encode(vector: np.ndarray) -> bytes:
    """A 1-d float vector as float16 bytes (values beyond float16's range are clipped)."""
    v = np.asarray(vector, dtype=np.float32).ravel()
    if not np.all(np.isfinite(v)):
        raise ValueError("embedding has NaN or infinite values")
    return np.clip(v, -_F16_MAX, _F16_MAX).astype(STORED).tobytes()


def decode(blob: bytes, dim: int) -> np.ndarray:
    """The stored bytes as a float32 vector of ``dim`` values."""
    v = np.frombuffer(blob, dtype=STORED)
    if v.size != dim:
        raise ValueError(f"embedding of {v.size} values where {dim} were recorded")
    return v.astype(np.float32)


def store(session: Session, track_id: int, model_id: int, vector: np.ndarray, windows: int, *, now: datetime | None = None) -> None:
    """Insert or replace ``model_id``'s embedding of ``track_id``."""
    v = np.asarray(vector).ravel()
    values = {"dim": int(v.size), "vector": encode(v), "windows": int(windows), "created_at": now or utcnow()}
    stmt = insert(_emb).values(track_id=track_id, model_id=model_id, **values)
    session.connection().execute(stmt.on_conflict_do_update(index_elements=["track_id", "model_id"], set_=values))


def model_id_of(session: Session, sha256: str) -> int | None:
    """The ``models`` row of a weights file, None if it never classified anything here."""
    return session.scalar(select(Model.id).where(Model.sha256 == sha256))


def get(session: Session, track_id: int, model_id: int) -> np.ndarray | None:
    row = session.connection().execute(
        select(_emb.c.vector, _emb.c.dim).where(_emb.c.track_id == track_id, _emb.c.model_id == model_id)
    ).first()
    return decode(row.vector, row.dim) if row is not None else None


def for_paths(session: Session, model_id: int, paths: Iterable[str]) -> dict[str, np.ndarray]:
    """``{path: embedding}`` of ``model_id`` for those of ``paths`` that have one."""
    wanted = list(dict.fromkeys(paths))
    out: dict[str, np.ndarray] = {}
    stmt = (
        select(_tracks.c.path, _emb.c.vector, _emb.c.dim)
        .join(_emb, _emb.c.track_id == _tracks.c.id)
        .where(_emb.c.model_id == model_id, _tracks.c.path.in_(bindparam("paths", expanding=True)))
    )
    conn = session.connection()
    for i in range(0, len(wanted), 500):  # SQLite caps the number of bound parameters
        for path, blob, dim in conn.execute(stmt, {"paths": wanted[i : i + 500]}):
            out[path] = decode(blob, dim)
    return out


def with_embedding(session: Session, model_id: int) -> set[str]:
    """Paths of every track that has ``model_id``'s embedding."""
    stmt = select(_tracks.c.path).join(_emb, _emb.c.track_id == _tracks.c.id).where(_emb.c.model_id == model_id)
    return set(session.connection().execute(stmt).scalars())


#: float16 bit pattern → float32 value. numpy's own float16 conversion slows down
#: several-fold on zeros, and half of a ReLU network's features are zero; a table lookup
#: takes the same time whatever the values.
_F16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


#: Rows per ``group_concat`` in :func:`blocks`: few Python objects, blocks that stay in cache.
_CHUNK = 4096


def blocks(session: Session, model_id: int, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Track ids and their ``dim``-value embeddings (float32, one row each), a block of up to
    4,096 at a time, of every track still there (rows of another size, which one model
    never writes, are left out).

    The cost of 100,000 rows is Python building a tuple and a bytes object per row, so
    SQLite concatenates them instead, one query per block (a range of ``id``, read in
    index order: no sort): ``group_concat`` of the track ids and of the vectors, which
    go through both aggregates in the same order. Tracks that are gone are masked out
    (they are few; a join per row costs more), and a table lookup turns float16 into
    float32. Memory stays at one block whatever the library. ``benchmarks/similar_query.py``
    measures it.
    """
    driver = session.connection().connection.driver_connection
    gone_q = f"SELECT id FROM tracks WHERE status IN ({', '.join('?' * len(GONE))})"
    gone = np.fromiter((r[0] for r in driver.execute(gone_q, GONE)), dtype=np.int64)
    lo, hi = driver.execute("SELECT min(id), max(id) FROM embeddings WHERE model_id = ?", (model_id,)).fetchone()
    if lo is None:
        return
    size = dim * STORED.itemsize
    where = "FROM embeddings WHERE model_id = ? AND id >= ? AND id < ?"
    for start in range(lo, hi + 1, _CHUNK):
        args = (model_id, start, start + _CHUNK)
        ids_text, blob = driver.execute(f"SELECT group_concat(track_id), CAST(group_concat(vector, '') AS BLOB) {where}", args).fetchone()
        if ids_text is None:
            continue
        ids = np.array(ids_text.split(","), dtype=np.int64)
        if len(blob) != len(ids) * size:  # a row of another size in this range: row by row
            rows = [r for r in driver.execute(f"SELECT track_id, vector {where}", args) if len(r[1]) == size]
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            blob = b"".join(r[1] for r in rows)
        bits = np.frombuffer(blob, dtype="<u2").reshape(len(ids), dim)
        if len(gone):
            keep = ~np.isin(ids, gone)
            ids, bits = ids[keep], bits[keep]
        if len(ids):
            yield ids, _F16_TABLE[bits]


def count(session: Session, model_id: int | None = None) -> int:
    from sqlalchemy import func

    stmt = select(func.count()).select_from(_emb)
    if model_id is not None:
        stmt = stmt.where(_emb.c.model_id == model_id)
    return int(session.scalar(stmt) or 0)
