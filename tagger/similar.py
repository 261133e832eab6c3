"""``tagger similar``: the tracks nearest to one, by cosine similarity of stored embeddings.

Everything comes from the database: the query's embedding and every other track's of
the same model, loaded as one float16 matrix and compared in numpy (a single matrix-
vector product). ``benchmarks/similar_query.py`` measures a query over 100,000 stored
embeddings; the figure is in docs/benchmarks.md. No audio is decoded and no model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from . import tags
from .model.bundle import Bundle
from .store import embeddings, repo
from .store.db import Database
from .store.models import Track


class SimilarError(Exception):
    """The query cannot be answered (not scanned, no embedding); the message says what to run."""


@dataclass
class Neighbour:
    path: str
    similarity: float
    duration: float | None
    genres: tuple[str, ...] = ()
    note: str = ""  # why the genres are missing (tags unreadable)

    def to_json(self) -> dict:
        return {"path": self.path, "similarity": round(self.similarity, 4), "duration": self.duration, "genres": list(self.genres), "note": self.note}


def nearest(db: Database, base: Bundle, path: str, n: int = 10) -> list[Neighbour]:
    """The ``n`` tracks most similar to ``path`` (cosine of ``base``'s embeddings), best first.

    Tracks whose file is gone (missing, removed) or no longer decodes are left out.
    """
    with db.session(write=False) as s:
        model_id = embeddings.model_id_of(s, base.sha256)
        track = repo.get_track(s, path)
        if track is None:
            raise SimilarError(f"{path}: not in the database: run `tagger scan --embed {path}` first")
        q = embeddings.get(s, track.id, model_id) if model_id is not None else None
        if q is None:
            raise SimilarError(f"{path}: no embedding of the model {base.name} yet: run `tagger scan --embed {path}`")
        id_parts, sim_parts = [], []
        q_norm = float(np.linalg.norm(q)) or 1.0
        # einsum, not BLAS: a block's product is small, and OpenBLAS's threads cost more
        # to wake than the product (10-30 ms a call on a busy 2-core machine).
        for ids, x in embeddings.blocks(s, model_id, q.shape[0]):
            norms = np.sqrt(np.einsum("ij,ij->i", x, x))
            id_parts.append(ids)
            sim_parts.append(np.einsum("ij,j->i", x, q) / (np.maximum(norms, 1e-12) * q_norm))
    if not id_parts:
        return []
    ids, sim = np.concatenate(id_parts), np.concatenate(sim_parts)
    sim[ids == track.id] = -np.inf  # not itself
    n = max(0, min(n, len(ids) - int(np.any(ids == track.id))))
    if n == 0:
        return []
    top = np.argpartition(-sim, n - 1)[:n]
    top = top[np.argsort(-sim[top], kind="stable")]
    wanted = [int(i) for i in ids[top]]
    with db.session(write=False) as s:
        rows = {r.id: r for r in s.execute(select(Track.id, Track.path, Track.duration).where(Track.id.in_(wanted)))}
    out = []
    for i, score in zip(wanted, sim[top], strict=True):
        r = rows[i]
        try:
            genres, note = tags.read_state(r.path).genres, ""
        except tags.TagError as exc:
            genres, note = (), exc.reason
        out.append(Neighbour(r.path, float(score), r.duration, genres, note))
    return out


def write_playlist(path: str | Path, seed: str, tracks: list[Neighbour], *, seed_duration: float | None = None) -> Path:
    """An extended M3U (UTF-8) of the seed track then its neighbours, absolute paths, written atomically."""
    path = Path(path)
    lines = ["#EXTM3U"]
    for p, d in [(seed, seed_duration), *((t.path, t.duration) for t in tracks)]:
        lines += [f"#EXTINF:{round(d) if d else -1},{Path(p).stem}", p]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def duration_of(db: Database, path: str) -> float | None:
    with db.session(write=False) as s:
        t = repo.get_track(s, path)
        return t.duration if t is not None else None
