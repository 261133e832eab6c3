"""Embeddings at the library level: filling the gaps, and a learnt head on stored ones.

* :func:`missing_embeddings` and :func:`embed` (``tagger scan --embed``): decode and embed
  the files that have no embedding of the base model yet (tracks scanned before embeddings were kept, or never
  scanned), writing nothing to the files and recording no prediction.
* :func:`head_from_stored` (``tagger scan`` with a learnt head): files already scanned get
  the head's genres from their stored embedding, without decoding; the scan then applies
  them like any stored prediction (:meth:`tagger.library.Library.reapply`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
from sqlalchemy import and_, or_, select

from .library import FileStat, Library
from .model.head import HeadBundle, HeadClassifier
from .model.infer import Classification, Classifier
from .store import embeddings, repo
from .store.models import (
    TAG_SETTINGS_RESTORED,
    TRACK_CLASSIFIED,
    TRACK_FAILED,
    TRACK_KEPT,
    TRACK_PENDING,
    TRACK_TAGGED,
    TRACK_UNTAGGED,
    Embedding,
    Prediction,
    Track,
)


def _base_classifier(library: Library) -> Classifier:
    clf = library.classifier
    assert clf is not None
    return clf.base if isinstance(clf, HeadClassifier) else clf


def missing_embeddings(library: Library, files: Iterable[FileStat]) -> list[FileStat]:
    """The files of ``files`` that have no embedding of the base model."""
    with library.db.session(write=False) as s:
        have = embeddings.with_embedding(s, library.embedding_model_id)
    return [f for f in files if f.path not in have]


def embed(
    library: Library, files: Iterable[FileStat], *, on_result: Callable[[Classification], None] | None = None
) -> Counter[str]:
    """Decode and embed ``files`` with the base model; counts of ``embedded`` and ``failed``.

    The files' tags are not read or written and no prediction is recorded. A file new to
    the database becomes a ``pending`` track (the next scan classifies and tags it); a file
    that cannot be decoded is recorded as failed, as a scan would.
    """
    todo = {f.path: f for f in files}
    model_id = library.embedding_model_id
    counts: Counter[str] = Counter()
    for r in _base_classifier(library).classify(list(todo)):
        seen = todo[r.path]
        if r.ok and r.embedding is None:  # the model's fault, not the file's: record nothing
            r = replace(r, error=f"the model {library.classifier.bundle.name} gives no embedding")
            counts["failed"] += 1
        elif not r.ok:
            with library.db.session() as s:
                repo.upsert_track(s, r.path, size=seen.size, mtime=seen.mtime, status=TRACK_FAILED)
                repo.mark_failed(s, r.path, r.error or "unknown error")
            counts["failed"] += 1
        else:
            with library.db.session() as s:
                track = repo.get_track(s, r.path)
                if track is None:
                    ext = Path(r.path).suffix.lower().lstrip(".")
                    track = repo.upsert_track(s, r.path, size=seen.size, mtime=seen.mtime, duration=r.duration, format=ext, status=TRACK_PENDING)
                embeddings.store(s, track.id, model_id, r.embedding, r.windows)
                counts["embedded"] += 1
        if on_result is not None:
            on_result(r)
    return counts


def head_from_stored(library: Library, files: Iterable[FileStat], skip: Iterable[FileStat] = ()) -> list[FileStat]:
    """Record the learnt head's prediction for every file of ``files`` (not in ``skip``) that
    has the base model's embedding but no prediction of this head; return those files.

    Only tracks with a settled outcome (classified, tagged, kept) and not restored are
    taken: pending and changed files are classified by the scan anyway, failed ones have
    nothing to go on, and a restored file stays as the person left it.
    """
    clf = library.classifier
    if clf is None or not isinstance(clf.bundle, HeadBundle):
        return []
    head: HeadBundle = clf.bundle
    head_id, base_id = library.model_id, library.embedding_model_id
    by_path = {f.path: f for f in files}
    for f in skip:
        by_path.pop(f.path, None)
    t, e, p = Track.__table__, Embedding.__table__, Prediction.__table__
    stmt = (
        select(t.c.id, t.c.path, e.c.vector, e.c.dim, e.c.windows)
        .join(e, and_(e.c.track_id == t.c.id, e.c.model_id == base_id))
        .outerjoin(p, and_(p.c.track_id == t.c.id, p.c.model_id == head_id))
        .where(
            p.c.id.is_(None),
            t.c.status.in_((TRACK_CLASSIFIED, TRACK_TAGGED, TRACK_KEPT, TRACK_UNTAGGED)),
            or_(t.c.tag_settings.is_(None), t.c.tag_settings != TAG_SETTINGS_RESTORED),
        )
    )
    with library.db.session(write=False) as s:
        rows = [r for r in s.connection().execute(stmt) if r.path in by_path]
    if not rows:
        return []
    x = np.stack([embeddings.decode(r.vector, r.dim) for r in rows])
    probs = head.probabilities(x)
    with library.db.session() as s:
        for r, row in zip(rows, probs, strict=True):
            p_map = {g: float(v) for g, v in zip(head.labels, row, strict=True)}
            chosen, _, _ = library.choose(p_map)
            repo.record_prediction(s, r.id, head_id, p_map, [library.display(g) for g in chosen], r.windows)
    return [by_path[r.path] for r in rows]
