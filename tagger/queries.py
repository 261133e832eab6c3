"""Read-only views of the genre database for ``query``, ``show`` and ``stats``."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from sqlalchemy import bindparam, text

from . import paths
from .store.db import Database
from .store.models import FsPath

_COLUMNS = ("path", "status", "top_genre", "confidence", "written_genres", "model_name", "last_scanned")


def query_tracks(
    db: Database,
    *,
    genre: str | None = None,
    min_confidence: float | None = None,
    status: str | None = None,
    path_glob: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of the ``track_genres`` view, filtered; the genre matches label or written name.

    ``path_glob`` matches the path's bytes; a pattern with ``\\xNN`` escapes (as ``query``
    prints names that are not UTF-8) also matches the bytes they stand for.
    """
    where, params = [], {}
    if genre:
        where.append("(lower(top_genre) = :g OR lower(replace(top_genre, '-', '')) = :g2 OR lower(written_genres) LIKE :gl)")
        params.update(g=genre.lower(), g2=genre.lower().replace("-", ""), gl=f'%"{genre.lower()}"%')
    if min_confidence is not None:
        where.append("confidence >= :c")
        params["c"] = min_confidence
    if status:
        where.append("status = :s")
        params["s"] = status
    binds = []
    if path_glob:
        globs = paths.candidates(path_glob)
        # CAST: SQLite's GLOB never matches a BLOB (a name that is not UTF-8) as it is.
        where.append("(" + " OR ".join(f"CAST(path AS TEXT) GLOB CAST(:p{i} AS TEXT)" for i in range(len(globs))) + ")")
        for i, g in enumerate(globs):
            params[f"p{i}"] = g
            binds.append(bindparam(f"p{i}", type_=FsPath))
    sql = f"SELECT {', '.join(_COLUMNS)} FROM track_genres"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY CAST(path AS BLOB)"  # byte order, whether a path is TEXT or BLOB
    if limit:
        sql += f" LIMIT {int(limit)}"
    stmt = text(sql).bindparams(*binds).columns(path=FsPath) if binds else text(sql).columns(path=FsPath)
    with db.session(write=False) as s:
        rows = [dict(r._mapping) for r in s.execute(stmt, params)]
    for r in rows:
        r["written_genres"] = json.loads(r["written_genres"]) if r["written_genres"] else []
        if r["last_scanned"] is not None:
            r["last_scanned"] = str(r["last_scanned"])
    return rows


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(_COLUMNS)
        for r in rows:
            w.writerow([("; ".join(r[c]) if isinstance(r[c], list) else r[c]) for c in _COLUMNS])
        return buf.getvalue()
    lines = [f"{'status':<11}{'genre':<11}{'conf':>6}  {'written':<20} path"]
    for r in rows:
        conf = f"{r['confidence']:.2f}" if r["confidence"] is not None else "-"
        lines.append(f"{r['status']:<11}{(r['top_genre'] or '-'):<11}{conf:>6}  {'; '.join(r['written_genres']) or '-':<20} {paths.display(r['path'])}")
    lines.append(f"({len(rows)} tracks)")
    return "\n".join(lines) + "\n"


def show_track(db: Database, path: str) -> dict[str, Any] | None:
    """Everything about one track; ``path`` may be the ``\\xNN`` form ``query`` prints."""
    stmt = text("SELECT * FROM tracks WHERE path = :p").bindparams(bindparam("p", type_=FsPath)).columns(path=FsPath)
    with db.session(write=False) as s:
        for candidate in paths.candidates(path):
            t = s.execute(stmt, {"p": candidate}).mappings().first()
            if t is not None:
                break
        else:
            return None
        preds = s.execute(
            text(
                "SELECT p.*, m.name AS model_name, m.sha256 FROM predictions p JOIN models m ON m.id = p.model_id "
                "WHERE p.track_id = :t ORDER BY p.created_at DESC"
            ),
            {"t": t["id"]},
        ).mappings().all()
        writes = s.execute(text("SELECT * FROM tag_writes WHERE track_id = :t ORDER BY id"), {"t": t["id"]}).mappings().all()
    return {
        **{k: t[k] for k in ("path", "status", "last_error", "size", "mtime", "duration", "format", "last_scanned")},
        "predictions": [
            {
                "model": f"{p['model_name']} {p['sha256'][:12]}",
                "created_at": str(p["created_at"]),
                "probabilities": json.loads(p["probabilities"]),
                "chosen": json.loads(p["genres"]),
                "windows": p["windows"],
            }
            for p in preds
        ],
        "tag_writes": [
            {
                "written_at": str(w["written_at"]),
                "policy": w["policy"],
                "before": json.loads(w["genres_before"]),
                "after": json.loads(w["genres_after"]),
                "reason": w["reason"],
                "dry_run": bool(w["dry_run"]),
                "restored": bool(w["restored"]),
            }
            for w in writes
        ],
    }


def track_stats(db: Database) -> dict[str, Any]:
    with db.session(write=False) as s:
        total = s.execute(text("SELECT count(*) FROM tracks")).scalar_one()
        by_status = dict(s.execute(text("SELECT status, count(*) FROM tracks GROUP BY status ORDER BY 2 DESC")).all())
        by_genre = dict(
            s.execute(
                text("SELECT top_genre, count(*) FROM track_genres WHERE top_genre IS NOT NULL AND status NOT IN ('removed', 'missing') GROUP BY top_genre ORDER BY 2 DESC")
            ).all()
        )
    return {"total": total, "by_status": by_status, "by_genre": by_genre}


def plot_stats(stats: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    genres = list(stats["by_genre"])
    counts = [stats["by_genre"][g] for g in genres]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.bar(genres, counts, color="#7b3294")
    ax.set_ylabel("tracks")
    ax.set_title(f"Top genre of {sum(counts)} tracks")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
