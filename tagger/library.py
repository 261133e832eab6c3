"""The library: walk folders, decide what needs work, classify, tag, record.

``tagger scan`` and the daemon both go through :class:`Library`, so a file is
handled the same way whichever noticed it. Bookkeeping follows beets: the size
and mtime of a file are recorded after our own write, so the next scan (or the
watcher) does not mistake tagger's change for the user's.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import signal
import stat as statmod
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import paths as paths_
from . import tags, vocabulary
from .config import Config, TagsConfig
from .model.head import base_of
from .model.infer import Classification, Classifier
from .store import embeddings, repo
from .store.db import Database
from .store.models import (
    TAG_SETTINGS_RESTORED,
    TRACK_CLASSIFIED,
    TRACK_FAILED,
    TRACK_KEPT,
    TRACK_MISSING,
    TRACK_PENDING,
    TRACK_TAGGED,
    TRACK_UNTAGGED,
)
from .tags.orders import WriteOrder, Written, fold, write_tags
from .vocabulary import NONE_LABEL

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
    on_swept: Callable[[str], None] | None = None,
) -> Iterator[FileStat]:
    """Every taggable audio file under ``roots`` with its size and mtime.

    Hidden and system entries are skipped, symlinked folders are followed once
    (a loop back to a folder already seen is skipped), unreadable folders are
    reported through ``on_error`` and skipped.

    ``on_swept``: also delete, in every folder walked, the temporary copies a killed
    tagger left (``.*.tagger-tmp`` that no live tagger holds: see
    :func:`tags.remove_stale_copy`), and report each one deleted. Without it the walk
    changes nothing.
    """
    include, exclude = tuple(include), tuple(exclude)
    match_all = include == ("*",) and not exclude  # the default: no pattern work per file
    seen_dirs: set[tuple[int, int]] = set()
    # Each root once, and a file named on its own yielded once, as itself, also when a
    # folder given beside it holds it (``scan ~/Music ~/Music/a.mp3``): twice, its second
    # decision would find the file just written and take it for a change made by someone else.
    roots = list(dict.fromkeys(Path(r).expanduser().absolute() for r in roots))
    named = {str(r) for r in roots if r.is_file()}
    for root in roots:
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
                    if on_swept is not None and tags.is_temporary_copy(name) and tags.remove_stale_copy(e.path):
                        on_swept(e.path)
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
                if not statmod.S_ISREG(st.st_mode) or e.path in named:
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

    def shortfall(self, p: float) -> str:
        """``"0.597 < 0.6"``: a probability below ``min_confidence`` as people read it, with
        as many decimals as it takes (two at least) for the two not to look equal or
        reversed, as 0.60 < 0.60 or 0.36 < 1.00 (for 0.999) would."""
        t = self.min_confidence
        for digits in range(2, 7):
            shown_p, shown_t = f"{p:.{digits}f}", f"{t:.{digits}f}"
            if float(shown_p) < float(shown_t) and float(shown_t) == round(t, 6):
                return f"{shown_p} < {shown_t}"
        return f"{p:.7g} < {t:g}"

    def choose(self, probabilities: Mapping[str, float]) -> tuple[list[str], float, int]:
        """The labels to write: the top ``top_k`` at or above ``min_confidence``.

        Also the top probability, and how many of the top ``top_k`` were left out for
        being below ``min_confidence`` while others were chosen (for the summary).
        Shared by scan, the daemon and the beets plugin, so each writes the same genres.
        """
        ranked = sorted(probabilities.items(), key=lambda kv: -kv[1])
        top = ranked[0][1] if ranked else 0.0
        if ranked and ranked[0][0] == NONE_LABEL:  # "none of my genres" first: nothing is written
            return [], top, 0
        ranked = [kv for kv in ranked if kv[0] != NONE_LABEL][: self.top_k]
        chosen = [g for g, p in ranked if p >= self.min_confidence]
        return chosen, top, (len(ranked) - len(chosen) if chosen else 0)

    def display(self, label: str) -> str:
        """A label as written into tags (``[tags.names]``, else tagger's own name for it)."""
        return vocabulary.display(label, self.names)

    def fingerprint(self) -> str:
        """A short hash of the settings that decide what a prediction writes.

        Recorded per track (``tracks.tag_settings``): a scan under other settings
        applies them from the stored prediction instead of calling the file unchanged.
        The separator is left out: it is how ID3v2.3 spells several genres, not a choice
        of genres.
        """
        data = {"policy": self.policy, "top_k": self.top_k, "min_confidence": self.min_confidence, "names": sorted(self.names.items())}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Outcome:
    """What happened to one file; ``action`` is what the summary counts."""

    path: str
    action: str  # tagged | would-tag | kept | low-confidence | no-genre | failed | changed | unchanged
    genres: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    confidence: float | None = None
    reason: str = ""
    #: Genres within top_k left out for being below min_confidence (when some were chosen).
    below: int = 0

    def to_json(self) -> dict:
        return {"path": self.path, "action": self.action, "genres": list(self.genres), "before": list(self.before), "confidence": self.confidence, "reason": self.reason, "below_min_confidence": self.below}


@dataclass
class TagJob:
    """A write decided under the policy, with what recording it takes (see :meth:`Library.begin`)."""

    order: WriteOrder
    track_id: int
    change: dict = field(repr=False)
    state: tags.GenreState = field(repr=False)
    settings: str
    outcome: Outcome
    write_id: int | None = None

    @property
    def path(self) -> str:
        return self.order.path


class Library:
    """The database, a classifier and the tagging options, composed."""

    def __init__(self, db: Database, classifier: Classifier | None, options: Options):
        self.db = db
        self.classifier = classifier
        self.options = options
        self._model_id: int | None = None
        self._embedding_model_id: int | None = None

    @property
    def model_id(self) -> int:
        if self._model_id is None:
            assert self.classifier is not None
            b = self.classifier.bundle
            with self.db.session() as s:
                self._model_id = repo.ensure_model(s, b.sha256, b.name, b.labels, b.meta.get("metrics", {}))
        return self._model_id

    @property
    def embedding_model_id(self) -> int:
        """The model whose embeddings are stored: the base model under a learnt head."""
        if self._embedding_model_id is None:
            assert self.classifier is not None
            b = base_of(self.classifier.bundle)
            if b is self.classifier.bundle:
                self._embedding_model_id = self.model_id
            else:
                with self.db.session() as s:
                    self._embedding_model_id = repo.ensure_model(s, b.sha256, b.name, b.labels, b.meta.get("metrics", {}))
        return self._embedding_model_id

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

    def unsettled(self, files: Iterable[FileStat], todo: Iterable[FileStat]) -> list[FileStat]:
        """Files not in ``todo`` whose genre was decided under other tag settings.

        Other settings (``--policy``, ``--top-k``, ``min_confidence``, genre names),
        a dry run or a failed tag write: :meth:`reapply` applies the settings from
        the stored prediction, without classifying the file again.
        """
        skip = {f.path for f in todo}
        with self.db.session(write=False) as s:
            stale = repo.unsettled(s, self.options.fingerprint())
        return [f for f in files if f.path in stale and f.path not in skip]

    def choose(self, probabilities: Mapping[str, float]) -> tuple[list[str], float, int]:
        return self.options.choose(probabilities)

    def why_untagged(self, probabilities: Mapping[str, float]) -> tuple[str, str]:
        """The outcome's action and the reason recorded when :meth:`choose` writes nothing."""
        best, p = max(probabilities.items(), key=lambda kv: kv[1])
        if best == NONE_LABEL:
            runner = max(((g, q) for g, q in probabilities.items() if g != NONE_LABEL), key=lambda kv: kv[1], default=None)
            also = f"; closest {runner[0]} {runner[1]:.2f}" if runner else ""
            return "no-genre", f"none of the model's genres ({NONE_LABEL} {p:.2f}{also})"
        return "low-confidence", f"low confidence: {best} {self.options.shortfall(p)}"

    def display(self, label: str) -> str:
        return self.options.display(label)

    def apply(self, result: Classification, seen: FileStat, *, defer: bool = False) -> Outcome | TagJob:
        """Record a classification and write the genre into the file if the policy says so.

        ``defer``: a write is recorded write-ahead and handed back as a :class:`TagJob`
        instead of made (see :meth:`_tag`); everything else happens as without it.
        """
        path = result.path
        if not result.ok and result.retry:
            with self.db.session() as s:
                repo.upsert_track(s, path, size=seen.size, mtime=seen.mtime, status=TRACK_PENDING)
                repo.set_status(s, path, TRACK_PENDING, error=result.error)
            return Outcome(path, "failed", reason=result.error or "")
        if not result.ok:
            with self.db.session() as s:
                # The size and mtime that failed, so an unchanged broken file is not retried
                # on every scan but a replaced one is.
                repo.upsert_track(s, path, size=seen.size, mtime=seen.mtime, status=TRACK_FAILED)
                repo.mark_failed(s, path, result.error or "unknown error")
            return Outcome(path, "failed", reason=result.error or "")
        st = self._still(seen)
        if isinstance(st, Outcome):
            return st
        ext = Path(path).suffix.lower().lstrip(".")
        model_id = self.model_id
        emb_model_id = self.embedding_model_id if result.embedding is not None else None
        with self.db.session() as s:
            # Pending until the outcome below is recorded: a scan interrupted in between
            # leaves the file for the next scan to take again.
            track = repo.upsert_track(s, path, size=st.st_size, mtime=st.st_mtime, duration=result.duration, format=ext, status=TRACK_PENDING)
            labels, _, _ = self.choose(result.probabilities)
            repo.record_prediction(s, track.id, model_id, result.probabilities, [self.display(g) for g in labels], result.windows)
            if emb_model_id is not None:  # same transaction: learn and similar never decode it again
                embeddings.store(s, track.id, emb_model_id, result.embedding, result.windows)
            track_id = track.id
        model_tag = self.classifier.bundle.sha256[:12] if self.classifier else ""
        return self._tag(path, track_id, st, result.probabilities, model_id, model_tag, defer=defer)

    def reapply(self, seen: FileStat) -> Outcome | None:
        """Apply the current tag settings to an unchanged file from its stored prediction.

        No decoding, no model: what ``scan --policy merge`` or ``--top-k 2`` on an
        already-scanned library needs. None when there is no prediction to apply (the
        file must be classified).
        """
        from .store.models import Model

        path = seen.path
        current = (self.model_id, self.classifier.bundle.labels) if self.classifier is not None else None
        with self.db.session(write=False) as s:
            track = repo.get_track(s, path)
            pred = repo.latest_prediction(s, track.id, current[0] if current else None) if track is not None else None
            if pred is None and track is not None and current is not None:
                # Another model's prediction serves only if it has the same genres (a
                # retrained model); a learnt head's and the base model's do not mix.
                pred = repo.latest_prediction(s, track.id)
                other = s.get(Model, pred.model_id) if pred is not None else None
                if other is None or list(other.labels) != list(current[1]):
                    pred = None
            if track is None or pred is None:
                return None
            track_id, probabilities, model_id = track.id, dict(pred.probabilities), pred.model_id
            windows, created = pred.windows, pred.created_at
            model = s.get(Model, model_id)
            model_tag = model.sha256[:12] if model is not None else ""
        st = self._still(seen)
        if isinstance(st, Outcome):
            return st
        labels, _, _ = self.choose(probabilities)
        with self.db.session() as s:
            repo.record_prediction(s, track_id, model_id, probabilities, [self.display(g) for g in labels], windows, now=created)
        return self._tag(path, track_id, st, probabilities, model_id, model_tag)

    def _still(self, seen: FileStat) -> os.stat_result | Outcome:
        """The file's stat if it is still the one looked at, else the outcome to report."""
        path = seen.path
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
        return st

    def _tag(self, path: str, track_id: int, st: os.stat_result, probabilities: Mapping[str, float], model_id: int, model_tag: str, *, defer: bool = False) -> Outcome | TagJob:
        """Decide under the policy and write; record the outcome and the settings it was decided under.

        ``defer``: stop once the write-ahead record is committed and hand back the
        :class:`TagJob`, for an engine that makes the write on another machine
        (:func:`write_tags` there, then :meth:`finish` here).
        """
        job = self._plan(path, track_id, st, probabilities, model_id, model_tag)
        if isinstance(job, Outcome):
            return job
        if defer:
            self.begin(job)
            return job
        with _interrupt_deferred():  # the record, the write and the bookkeeping go together
            self.begin(job)
            return self.finish(job, write_tags(job.order))

    def _settle(self, path: str, status: str, error: str | None = None, settled: str | None = None) -> None:
        with self.db.session() as s:
            repo.set_status(s, path, status, error=error)
            repo.set_tag_settings(s, path, settled)

    def _plan(self, path: str, track_id: int, st: os.stat_result, probabilities: Mapping[str, float], model_id: int, model_tag: str) -> Outcome | TagJob:
        """Everything up to the write: the outcome when there is nothing to write, else the job."""
        opts = self.options
        settings = opts.fingerprint()
        labels, top, below = self.choose(probabilities)
        genres = tuple(self.display(g) for g in labels)
        try:
            state: tags.GenreState | None = self._ours_only(tags.read_state(path, separator=opts.separator), track_id)
            unreadable = None
        except tags.TagError as exc:
            state, unreadable = None, exc

        if not genres:
            action, why = self.why_untagged(probabilities)
            # Nothing is written, nor taken out: a genre tagger wrote earlier (another model,
            # a lower min_confidence) stays until `tagger restore`, and the status says so.
            if state is not None and state.ours:
                why += f"; the file keeps tagger's earlier genre {', '.join(state.added)} (tagger restore takes it out)"
            status = TRACK_TAGGED if state is not None and state.ours else TRACK_UNTAGGED
            # A dry run records the reason but leaves the settings unsettled, as for a write.
            self._settle(path, status, why, settled=None if opts.dry_run else settings)
            return Outcome(path, action, confidence=top, reason=why)
        if state is None:
            assert unreadable is not None
            self._settle(path, TRACK_CLASSIFIED, f"tags unreadable: {unreadable.reason}")
            return Outcome(path, "failed", genres, confidence=top, reason=unreadable.reason, below=below)
        note = _content_note(path, state.kind)
        d = tags.decide(state, genres, opts.policy)
        if d.genres is None:
            status = TRACK_TAGGED if state.ours else TRACK_KEPT
            self._settle(path, status, settled=settings)
            action = "kept" if status == TRACK_KEPT else "unchanged"
            return Outcome(path, action, genres, state.genres, top, d.reason + note, below)
        new = d.genres
        change = {"policy": opts.policy, "before": list(state.genres), "after": list(new), "raw_before": state.raw, "reason": d.reason, "model_id": model_id}
        if opts.dry_run:
            with self.db.session() as s:
                repo.record_tag_write(s, track_id, **change, dry_run=True)
            # Nothing was written: the status says what the file holds now (tagger's genre,
            # only a person's, or none), and the settings stay unsettled so that the next
            # real scan does what this one showed.
            self._settle(path, TRACK_TAGGED if state.ours else TRACK_KEPT if state.genres else TRACK_CLASSIFIED)
            return Outcome(path, "would-tag", new, state.genres, top, d.reason + note, below)
        marker = tags.Marker(d.added, model_tag, round(top, 4)) if d.added else None
        done = Outcome(path, "tagged", new, state.genres, top, d.reason + note, below)
        order = WriteOrder(path, new, marker, opts.separator, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return TagJob(order, track_id, change, state, settings, done)

    def begin(self, job: TagJob) -> None:
        """Commit the write-ahead record of ``job``: the record of the change goes in before
        the file is touched, so even a kill -9 mid-write leaves restore its "before" value.
        Restore only acts where the file holds what the record says was written, so a write
        that never happened is harmless."""
        self._drop_unwritten(job.track_id, job.state)
        with self.db.session() as s:
            job.write_id = repo.record_tag_write(s, job.track_id, **job.change).id

    def finish(self, job: TagJob, written: Written) -> Outcome:
        """Record what became of ``job``'s write (made here or on another machine)."""
        path, done = job.path, job.outcome
        if written.changed:  # moved, deleted or edited meanwhile: nothing was written
            with self.db.session() as s:
                repo.delete_tag_write(s, job.write_id)
                _forget(s, path, "changed while being tagged")
            return replace(done, action="changed", reason="changed while being tagged; will be classified again")
        if written.error is not None:
            with self.db.session() as s:
                repo.delete_tag_write(s, job.write_id)
            self._settle(path, TRACK_CLASSIFIED, f"tag write failed: {written.error}")
            return replace(done, action="failed", reason=f"tag write failed: {written.error}")
        status = TRACK_TAGGED if job.order.marker is not None else TRACK_KEPT  # a merge may leave only the person's values
        with self.db.session() as s:
            repo.upsert_track(s, path, size=written.size, mtime=written.mtime, status=status)
            repo.set_status(s, path, status)
            repo.set_tag_settings(s, path, job.settings)
        return done

    def abandon(self, job: TagJob, why: str) -> Outcome:
        """A write whose result never came back (its machine was lost, retries ran out).

        Whether the file was written is unknown, so the write-ahead record stays and the
        file is left pending, as a kill -9 mid-write leaves it: the next scan classifies it
        again and either finds the write made (and recorded) or drops the record.
        """
        with self.db.session() as s:
            repo.set_status(s, job.path, TRACK_PENDING, error=f"tag write lost: {why}; will be classified again")
        return replace(job.outcome, action="failed", reason=f"tag write lost: {why}; will be classified again")

    def _drop_unwritten(self, track_id: int, state: tags.GenreState) -> None:
        """Delete the write-ahead record of a write that never happened (a kill -9 between
        the record and the file's replace): the file is still exactly as that record found
        it, so the write about to be made is the first, and is recorded once."""
        if state.raw is None:
            return
        with self.db.session() as s:
            writes = repo.open_writes(s, track_id)
            last = writes[-1] if writes else None
            if last is not None and last.raw_before == state.raw and fold(last.genres_after) != fold(state.genres):
                repo.delete_tag_write(s, last.id)

    def _ours_only(self, state: tags.GenreState, track_id: int) -> tags.GenreState:
        """Narrow a marker an older tagger wrote, which named every value written, a
        person's merged ones too, to what this database says tagger added."""
        if state.marker is None or not state.marker.legacy:
            return state
        with self.db.session(write=False) as s:
            theirs = {g.casefold() for w in repo.open_writes(s, track_id) if w.policy == "merge" for g in w.genres_before}
        return state.with_added([g for g in state.marker.added if g.casefold() not in theirs])

    def process(self, files: list[FileStat]) -> Iterator[Outcome]:
        """Classify ``files`` in shared batches and apply each result as it arrives."""
        assert self.classifier is not None
        by_path = {f.path: f for f in files}
        for result in self.classifier.classify(f.path for f in files):
            yield self.apply(result, by_path[result.path])

    def restore(self, paths: Iterable[str] | None) -> list[Outcome]:
        """Put back the genre a file had before tagger first touched it, exactly as stored.

        Only where the file still holds what tagger last wrote: a genre a person
        set since then is theirs and stays. The genre and marker fields are written
        back as the file stored them (numeric ID3 genres, padding, encodings), and a
        tag block tagger created is removed again.
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
                writes = repo.open_writes(s, track.id)
                track_id = track.id
            first, last = writes[0], writes[-1]
            try:
                st = os.stat(path)
                state = tags.read_state(path, separator=self.options.separator)
            except tags.TagError as exc:
                out.append(Outcome(path, "failed", reason=exc.reason))
                continue
            except OSError as exc:
                out.append(Outcome(path, "failed", reason=exc.strerror or str(exc)))
                continue
            if fold(state.genres) != fold(last.genres_after):
                out.append(Outcome(path, "kept", state.genres, reason="genre changed since tagger wrote it; left alone"))
                continue
            before = tuple(first.genres_before or ())
            if not self.options.dry_run:
                with _interrupt_deferred():
                    try:
                        if first.raw_before is not None:
                            tags.restore_fields(path, first.raw_before, expect=st)
                        else:  # recorded by a tagger that kept no raw values: the values as read
                            tags.write_genres(path, before, None, separator=self.options.separator, expect=st)
                    except tags.TagError as exc:
                        out.append(Outcome(path, "failed", reason=exc.reason))
                        continue
                    st = os.stat(path)
                    with self.db.session() as s:
                        repo.upsert_track(s, path, size=st.st_size, mtime=st.st_mtime, status=TRACK_CLASSIFIED)
                        repo.set_tag_settings(s, path, TAG_SETTINGS_RESTORED)  # stays restored until it changes
                        for w in writes:
                            repo.mark_restored(s, w.id)
                        repo.record_tag_write(s, track_id, policy="restore", before=list(state.genres), after=list(before), reason="restored the genre from before tagger")
            out.append(Outcome(path, "restored" if not self.options.dry_run else "would-restore", before, state.genres))
        return out


def _content_note(path: str, kind: str) -> str:
    """"; FLAC content in a .mp3 file" when the name says another format than the bytes."""
    named = tags.named_kind(path)
    if not kind or kind == named:
        return ""
    return f"; {kind} content in a {Path(path).suffix} file"


__all__ = ["FileStat", "Library", "Options", "Outcome", "TagJob", "WriteOrder", "Written", "walk", "write_tags", "TRACK_FAILED"]
