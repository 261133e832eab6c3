"""Embeddings in the database: one row per (track, model), compact float16 bytes.

A track's embedding is the model's pooled features before its genre layer, averaged
over the track's windows. It is written in the same transaction as the track's
prediction, so ``tagger learn`` (a head on the user's own genres) and ``tagger similar``
(nearest tracks) never decode audio that was already scanned. The dimension is stored
with every vector: another model has another one, and nothing here assumes it.

Like :mod:`tagger.store.repo`, these functions flush but never commit.
"""

from __future__ import annotations

from collections.abc import Iterable
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


def matrix(session: Session, model_id: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Track ids and their ``dim``-value embeddings (float32, one row each) of every track
    still there (rows of another size, which one model never writes, are left out).

    One SELECT of two columns on the driver's own cursor (no row objects), the tracks
    that are gone masked out afterwards (they are few, and a join per row costs more),
    one ``frombuffer`` over the joined bytes and a table lookup to float32: 100,000
    vectors load in a fraction of a second (``benchmarks/similar_query.py``).
    """
    driver = session.connection().connection.driver_connection
    gone_q = f"SELECT id FROM tracks WHERE status IN ({', '.join('?' * len(GONE))})"
    gone = np.fromiter((r[0] for r in driver.execute(gone_q, GONE)), dtype=np.int64)
    rows = driver.execute("SELECT track_id, vector FROM embeddings WHERE model_id = ?", (model_id,)).fetchall()
    blob = b"".join([r[1] for r in rows])
    if len(blob) != len(rows) * dim * STORED.itemsize:
        rows = [r for r in rows if len(r[1]) == dim * STORED.itemsize]
        blob = b"".join([r[1] for r in rows])
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    bits = np.frombuffer(blob, dtype="<u2").reshape(len(rows), dim)
    if len(gone):
        keep = ~np.isin(ids, gone)
        ids, bits = ids[keep], bits[keep]
    return ids, _F16_TABLE[bits]


def count(session: Session, model_id: int | None = None) -> int:
    from sqlalchemy import func

    stmt = select(func.count()).select_from(_emb)
    if model_id is not None:
        stmt = stmt.where(_emb.c.model_id == model_id)
    return int(session.scalar(stmt) or 0)
