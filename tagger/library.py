"""The library: walk folders, decide what needs work, classify, tag, record.

``tagger scan`` and the daemon both go through :class:`Library`, so a file is
handled the same way whichever noticed it. Bookkeeping follows beets: the size
and mtime of a file are recorded after our own write, so the next scan (or the
watcher) does not mistake tagger's change for the user's.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
import stat as statmod
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import paths as paths_
from . import tags
from .config import Config, TagsConfig
from .model.infer import Classification, Classifier
from .store import repo
from .store.db import Database
from .store.models import (
    TRACK_CLASSIFIED,
    TRACK_FAILED,
    TRACK_KEPT,
    TRACK_MISSING,
    TRACK_PENDING,
    TRACK_TAGGED,
)

log = logging.getLogger(__name__)

#: Names that are never music, whatever their extension: OS and NAS droppings.
SYSTEM_NAMES = frozenset({"desktop.ini", "thumbs.db", "@eadir", "$recycle.bin", "lost+found", "system volume information", "#recycle", "#snapshot"})


@contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block is done, then deliver it.

    Around a tag write and the database row that records it: an interrupt between
    the two would leave a file that tagger changed with no record of the change
    (so ``restore`` could not undo it). Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # signals go to the main thread; a handler set outside Python cannot be put back
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    mtime: float


def _matches(rel: str, name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def walk(
    roots: Iterable[str | Path],
    *,
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    follow_symlinks: bool = True,
    on_error: Callable[[str, str], None] | None = None,
) -> Iterator[FileStat]:
    """Every taggable audio file under ``roots`` with its size and mtime.

    Hidden and system entries are skipped, symlinked folders are followed once
    (a loop back to a folder already seen is skipped), unreadable folders are
    reported through ``on_error`` and skipped.
    """
    include, exclude = tuple(include), tuple(exclude)
    match_all = include == ("*",) and not exclude  # the default: no pattern work per file
    seen_dirs: set[tuple[int, int]] = set()
    for root in roots:
        root = Path(root).expanduser().absolute()
        if root.is_file():
            try:
                st = root.stat()
            except OSError as exc:
                if on_error:
                    on_error(str(root), exc.strerror or str(exc))
                continue
            if tags.supported(root):
                yield FileStat(str(root), st.st_size, st.st_mtime)
            continue
        prefix = os.path.join(str(root), "")
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                dst = d.stat()
                key = (dst.st_dev, dst.st_ino)
                if key in seen_dirs:
                    continue
                seen_dirs.add(key)
                with os.scandir(d) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                if on_error:
                    on_error(str(d), exc.strerror or str(exc))
                continue
            subdirs = []
            for e in entries:
                name = e.name
                if name.startswith(".") or name.lower() in SYSTEM_NAMES:
                    continue
                try:
                    if e.is_dir(follow_symlinks=follow_symlinks):
                        subdirs.append(Path(e.path))
                        continue
                    if not e.is_file(follow_symlinks=follow_symlinks) or not tags.supported(name):
                        continue
                    st = e.stat(follow_symlinks=follow_symlinks)
                except OSError as exc:
                    if on_error:
                        on_error(e.path, exc.strerror or str(exc))
                    continue
                if not statmod.S_ISREG(st.st_mode):
                    continue
                if not match_all:
                    rel = e.path[len(prefix) :]  # every folder walked lies under root (joined, never resolved)
                    if not _matches(rel, name, include) or _matches(rel, name, exclude):
                        continue
                yield FileStat(e.path, st.st_size, st.st_mtime)
            stack.extend(reversed(subdirs))


def _forget(s, path: str, why: str) -> None:
    """Pending, with size and mtime forgotten, so whatever is there next is classified again."""
    repo.upsert_track(s, path, size=0, mtime=0.0, status=TRACK_PENDING)
    repo.set_status(s, path, TRACK_PENDING, error=f"{why}; will be classified again")


_TAG_DEFAULTS = TagsConfig()


@dataclass
class Options:
    """What to do with a classification; defaults come from ``[tags]`` in the config."""

    policy: str = _TAG_DEFAULTS.policy
    top_k: int = _TAG_DEFAULTS.top_k
    min_confidence: float = _TAG_DEFAULTS.min_confidence
    separator: str = _TAG_DEFAULTS.separator
    dry_run: bool = False
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config, **overrides) -> Options:
        t = cfg.tags
        opts = cls(t.policy, t.top_k, t.min_confidence, t.separator, names=dict(t.names))
        for k, v in overrides.items():
            if v is not None:
                setattr(opts, k, v)
        return opts


@dataclass
class Outcome:
    """What happened to one file; ``action`` is what the summary counts."""

    path: str
    action: str  # tagged | would-tag | kept | low-confidence | failed | changed | unchanged
    genres: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    confidence: float | None = None
    reason: str = ""

    def to_json(self) -> dict:
        return {"path": self.path, "action": self.action, "genres": list(self.genres), "before": list(self.before), "confidence": self.confidence, "reason": self.reason}


class Library:
    """The database, a classifier and the tagging options, composed."""

    def __init__(self, db: Database, classifier: Classifier | None, options: Options):
        self.db = db
        self.classifier = classifier
        self.options = options
        self._model_id: int | None = None

    @property
    def model_id(self) -> int:
        if self._model_id is None:
            assert self.classifier is not None
            b = self.classifier.bundle
            with self.db.session() as s:
                self._model_id = repo.ensure_model(s, b.sha256, b.name, b.labels, b.meta.get("metrics", {}))
        return self._model_id

    def known(self) -> dict[str, tuple[int, float, str]]:
        with self.db.session(write=False) as s:
            return repo.known_files(s)

    @staticmethod
    def changed(
        files: Iterable[FileStat], known: dict[str, tuple[int, float, str]], *, force: bool = False
    ) -> tuple[list[FileStat], int]:
        """Files whose size or mtime differ from the database (all of them with ``force``).

        Pending and missing tracks are taken again even when unchanged: their work
        was not finished, or they are back.
        """
        todo, unchanged = [], 0
        for f in files:
            k = known.get(f.path)
            if not force and k is not None and k[0] == f.size and k[1] == f.mtime and k[2] not in (TRACK_PENDING, TRACK_MISSING):
                unchanged += 1
                continue
            todo.append(f)
        return todo, unchanged

    def choose(self, result: Classification) -> tuple[list[str], float]:
        """The labels to write: the top ``top_k`` at or above ``min_confidence``."""
        ranked = result.ranked()
        top = ranked[0][1] if ranked else 0.0
        chosen = [g for g, p in ranked[: self.options.top_k] if p >= self.options.min_confidence]
        return chosen, top

    def display(self, label: str) -> str:
        return self.options.names.get(label, label.title())

    def apply(self, result: Classification, seen: FileStat) -> Outcome:
        """Record a classification and write the genre into the file if the policy says so."""
        opts = self.options
        path = result.path
        if not result.ok:
            with self.db.session() as s:
                # The size and mtime that failed, so an unchanged broken file is not retried
                # on every scan but a replaced one is.
                repo.upsert_track(s, path, size=seen.size, mtime=seen.mtime, status=TRACK_FAILED)
                repo.mark_failed(s, path, result.error or "unknown error")
            return Outcome(path, "failed", reason=result.error or "")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            with self.db.session() as s:
                repo.mark_failed(s, path, "file vanished during the scan")
            return Outcome(path, "failed", reason="file vanished during the scan")
        if (st.st_size, st.st_mtime) != (seen.size, seen.mtime):
            with self.db.session() as s:
                _forget(s, path, "changed during the scan")
            return Outcome(path, "changed", reason="changed during the scan; will be classified again")
        labels, top = self.choose(result)
        genres = tuple(self.display(g) for g in labels)
        ext = Path(path).suffix.lower().lstrip(".")
        model_id = self.model_id
        with self.db.session() as s:
            # Pending until the outcome below is recorded: a scan interrupted in between, or a
            # dry run that would write, leaves the file for the next scan to take again.
            track = repo.upsert_track(s, path, size=st.st_size, mtime=st.st_mtime, duration=result.duration, format=ext, status=TRACK_PENDING)
            repo.record_prediction(s, track.id, model_id, result.probabilities, list(genres), result.windows)
            track_id = track.id
        if not genres:
            best = result.ranked()[0]
            reason = f"low confidence: {best[0]} {best[1]:.2f} < {opts.min_confidence:.2f}"
            with self.db.session() as s:
                repo.set_status(s, path, TRACK_CLASSIFIED, error=None)
            return Outcome(path, "low-confidence", confidence=top, reason=reason)
        try:
            state = tags.read_state(path, separator=opts.separator)
        except tags.TagError as exc:
            with self.db.session() as s:
                repo.set_status(s, path, TRACK_CLASSIFIED, error=f"tags unreadable: {exc}")
            return Outcome(path, "failed", genres, confidence=top, reason=str(exc))
        new, why = tags.decide(state, genres, opts.policy)
        if new is None:
            status = TRACK_TAGGED if state.ours else TRACK_KEPT
            with self.db.session() as s:
                repo.set_status(s, path, status)
            return Outcome(path, "kept" if status == TRACK_KEPT else "unchanged", genres, state.genres, top, why)
        change = {"policy": opts.policy, "before": list(state.genres), "after": list(new), "reason": why, "model_id": model_id}
        if opts.dry_run:
            with self.db.session() as s:
                repo.record_tag_write(s, track_id, **change, dry_run=True)
            return Outcome(path, "would-tag", new, state.genres, top, why)
        marker = tags.Marker(tuple(new), self.classifier.bundle.sha256[:12] if self.classifier else "", round(top, 4))
        # Write-ahead: the record of the change is committed before the file is touched,
        # so even a kill -9 mid-write leaves restore its "before" value. Restore only acts
        # where the file holds what the record says was written, so a write that never
        # happened is harmless.
        with _interrupt_deferred():  # the record, the write and the bookkeeping go together
            with self.db.session() as s:
                write_id = repo.record_tag_write(s, track_id, **change).id
            try:
                tags.write_genres(path, new, marker, separator=opts.separator, expect=st)
            except tags.FileChanged as exc:
                # Moved, deleted or edited meanwhile: nothing was written.
                with self.db.session() as s:
                    repo.delete_tag_write(s, write_id)
                    _forget(s, path, str(exc))
                return Outcome(path, "changed", new, state.genres, top, "changed while being tagged; will be classified again")
            except tags.TagError as exc:
                with self.db.session() as s:
                    repo.delete_tag_write(s, write_id)
                    repo.set_status(s, path, TRACK_CLASSIFIED, error=f"tag write failed: {exc}")
                return Outcome(path, "failed", new, state.genres, top, f"tag write failed: {exc}")
            st = os.stat(path)
            with self.db.session() as s:
                repo.upsert_track(s, path, size=st.st_size, mtime=st.st_mtime, status=TRACK_TAGGED)
                repo.set_status(s, path, TRACK_TAGGED)
        return Outcome(path, "tagged", new, state.genres, top, why)

    def process(self, files: list[FileStat]) -> Iterator[Outcome]:
        """Classify ``files`` in shared batches and apply each result as it arrives."""
        assert self.classifier is not None
        by_path = {f.path: f for f in files}
        for result in self.classifier.classify(f.path for f in files):
            yield self.apply(result, by_path[result.path])

    def restore(self, paths: Iterable[str] | None) -> list[Outcome]:
        """Put back the genre a file had before tagger first touched it.

        Only where the file still holds what tagger last wrote: a genre a person
        set since then is theirs and stays.
        """
        from sqlalchemy import select

        from .store.models import TagWrite, Track

        open_writes = (TagWrite.dry_run.is_(False), TagWrite.restored.is_(False), TagWrite.policy != "restore")
        out: list[Outcome] = []
        with self.db.session(write=False) as s:
            q = select(Track.path).join(TagWrite, TagWrite.track_id == Track.id).where(*open_writes).distinct()
            if paths is not None:
                # A name as ``query`` shows it (caf\xe9.mp3) finds the file too.
                wanted = [c for p in paths for c in paths_.candidates(str(Path(p).expanduser().absolute()))]
                q = q.where(Track.path.in_(wanted))
            todo = list(s.scalars(q))
        for path in todo:
            with self.db.session(write=False) as s:
                track = repo.get_track(s, path)
                writes = list(s.scalars(select(TagWrite).where(TagWrite.track_id == track.id, *open_writes).order_by(TagWrite.id)))
            first, last = writes[0], writes[-1]
            try:
                state = tags.read_state(path, separator=self.options.separator)
            except tags.TagError as exc:
                out.append(Outcome(path, "failed", reason=str(exc)))
                continue
            if tuple(g.casefold() for g in state.genres) != tuple(g.casefold() for g in last.genres_after):
                out.append(Outcome(path, "kept", state.genres, reason="genre changed since tagger wrote it; left alone"))
                continue
            before = tuple(first.genres_before or ())
            if not self.options.dry_run:
                with _interrupt_deferred():
                    try:
                        tags.write_genres(path, before, None, separator=self.options.separator)
                    except tags.TagError as exc:
                        out.append(Outcome(path, "failed", reason=str(exc)))
                        continue
                    st = os.stat(path)
                    with self.db.session() as s:
                        repo.upsert_track(s, path, size=st.st_size, mtime=st.st_mtime, status=TRACK_CLASSIFIED)
                        for w in writes:
                            repo.mark_restored(s, w.id)
                        repo.record_tag_write(s, track.id, policy="restore", before=list(state.genres), after=list(before), reason="restored the genre from before tagger")
            out.append(Outcome(path, "restored" if not self.options.dry_run else "would-restore", before, state.genres))
        return out


__all__ = ["FileStat", "Library", "Options", "Outcome", "walk", "TRACK_FAILED"]
