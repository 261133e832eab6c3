"""The reconciling scan: make the queue and the database agree with the folders.

Runs when the daemon starts (changes made while it was down), on the ``rescan_cron``
schedule (changes the watcher missed: an inotify queue overflow, a polling gap) and when
a folder that had disappeared comes back. It walks with :func:`tagger.library.walk`,
compares with :meth:`tagger.library.Library.changed` (the same rules as ``tagger scan``)
and *queues* what changed; the worker does the classifying. Besides:

* a file that vanished from one place and appeared in another with the same size and
  mtime was moved or renamed while nobody watched: its track is re-keyed, not
  re-classified;
* tracks that are gone from a folder that was scanned become ``missing``; folders that
  could not be read, and folders that are not there at all (unmounted), are left alone.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tagger.library import FileStat, Library, walk
from tagger.store import jobs, repo
from tagger.store.db import Database
from tagger.store.models import TRACK_MISSING, TRACK_REMOVED

from . import queue
from .watcher import PathFilter

log = logging.getLogger("tagger.reconcile")


@dataclass
class ReconcileResult:
    roots: list[str]
    files: int = 0
    queued: int = 0
    unchanged: int = 0
    moved: int = 0
    missing: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.files} files, {self.queued} queued, {self.moved} moved, {self.missing} missing"
            + (f", {len(self.errors)} unreadable" if self.errors else "")
            + f" ({self.seconds:.1f}s)"
        )


def enqueue_files(db: Database, files: Iterable[FileStat], settle_seconds: float) -> int:
    """Queue ``classify`` jobs; a file modified less than ``settle_seconds`` ago is queued
    to run once it is that old (the worker checks again). Files that already have a live
    job are left to it (it looks at the file as it is when it runs). Returns how many
    were queued."""
    now = time.time()
    files = list(files)
    n = 0
    for i in range(0, len(files), 500):
        chunk = files[i : i + 500]
        with db.session() as s:
            live = queue.live_paths(s, "classify", [f.path for f in chunk])
            for f in chunk:
                if f.path in live:
                    continue
                age = now - f.mtime
                delay = settle_seconds - age if 0 <= age < settle_seconds else 0.0
                jobs.enqueue(s, f.path, "classify", delay=delay)
                n += 1
    return n


def _swept(path: str) -> None:
    log.warning("removed %s: a temporary copy left by an interrupted tagger", path)


def reconcile(db: Database, filt: PathFilter, roots: Iterable[str], *, settle_seconds: float, include, exclude, follow_symlinks: bool = True) -> ReconcileResult:
    roots = [str(r) for r in roots]
    res = ReconcileResult(roots)
    t0 = time.monotonic()
    # Read the database before walking: a file the worker records while we walk is then
    # either seen by the walk or not in ``known``, never wrongly "vanished".
    with db.session(write=False) as s:
        known = repo.known_files(s)
    files = [
        f
        for f in walk(roots, include=include, exclude=exclude, follow_symlinks=follow_symlinks, on_error=lambda p, why: res.errors.append((p, why)), on_swept=_swept)
        if not filt.is_temporary(Path(f.path).name)
    ]
    res.files = len(files)
    todo, res.unchanged = Library.changed(files, known)
    seen = {f.path for f in files}
    prefixes = tuple(r.rstrip("/") + "/" for r in roots)
    bad = tuple(p.rstrip("/") + "/" for p, _ in res.errors)
    vanished = {
        p: (size, mtime)
        for p, (size, mtime, status) in known.items()
        if status not in (TRACK_MISSING, TRACK_REMOVED) and p not in seen and p.startswith(prefixes) and not p.startswith(bad)
    }
    # Moved while nobody watched: same (size, mtime), one old path, one new path.
    new = [f for f in todo if f.path not in known]
    old_keys = Counter(vanished.values())
    new_keys = Counter((f.size, f.mtime) for f in new)
    old_by_key = {v: p for p, v in vanished.items() if old_keys[v] == 1}
    moves = [(old_by_key[(f.size, f.mtime)], f) for f in new if f.size > 0 and new_keys[(f.size, f.mtime)] == 1 and (f.size, f.mtime) in old_by_key]
    if moves:
        with db.session() as s:
            for old, f in moves:
                repo.move_track(s, old, f.path)
                log.info("moved while unwatched: %s -> %s", old, f.path)
        moved = {f.path for _, f in moves}
        todo = [f for f in todo if f.path not in moved]
        for old, _ in moves:
            vanished.pop(old, None)
        res.moved = len(moves)
    if vanished:
        with db.session() as s:
            res.missing = repo.mark_missing(s, list(vanished))
    res.queued = enqueue_files(db, todo, settle_seconds)
    res.seconds = time.monotonic() - t0
    return res
