"""The worker: one thread that owns the classifier and works through the job queue.

It claims due jobs in batches, as many files as make ``[daemon] batch_size`` windows
(``[model] max_windows`` per file), once that many are ready, or the first of them has
waited ``max_wait`` seconds, or nothing else is about to settle. ``move`` and ``delete``
jobs only touch the database. ``classify`` jobs go through
:meth:`tagger.library.Library.process`, the pipeline ``tagger scan`` uses, so windows of
all the batch's files share fixed-size model batches (on the GPU when TensorFlow sees one).

Exactly once: before classifying, each file is compared with the database
(:meth:`Library.changed`). After tagger writes a tag it records the file's new size and
mtime, so its own write, when it comes back through the watcher or a rescan, compares
equal and is not done again; a job that is claimed twice (a crash between the tag write
and ``complete``) is skipped the same way.

A claimed job is heart-beaten while it runs; on shutdown the jobs not yet done are given
back (re-queued, the claim not counted as an attempt).
"""

from __future__ import annotations

import logging
import os
import stat as statmod
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

from tagger.config import Config
from tagger.library import FileStat, Library, Outcome, walk
from tagger.store import jobs, repo
from tagger.store.db import Database
from tagger.store.models import JOB_FAILED, TRACK_FAILED, TRACK_REMOVED, Job, utcnow

from . import queue
from .reconcile import enqueue_files
from .watcher import PathFilter

log = logging.getLogger("tagger.worker")


class Worker:
    def __init__(
        self,
        db: Database,
        library: Library,
        config: Callable[[], Config],
        path_filter: Callable[[], PathFilter],
        root_present: Callable[[str], bool],
        settling_soon: Callable[[float], bool] = lambda s: False,
        settling: Callable[[], int] = lambda: 0,
        on_outcome: Callable[[Outcome], None] = lambda o: None,
    ):
        self.db = db
        self.library = library
        self.config = config
        self.filter = path_filter
        self.root_present = root_present
        self.settling_soon = settling_soon
        self.settling = settling
        self.on_outcome = on_outcome
        self.worker_id = queue.new_worker_id()
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[int, Job] = {}
        self._thread: threading.Thread | None = None
        self._hb_thread: threading.Thread | None = None
        self.batches = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self._thread.start()
        self._hb_thread = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self._hb_thread.start()

    def stop(self, grace: float) -> None:
        """Stop claiming; finish the current batch if it ends within ``grace`` seconds,
        else give the rest of it back."""
        self._deadline = time.monotonic() + grace
        self._stop.set()
        self.wake.set()

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def inflight(self) -> list[int]:
        with self._lock:
            return list(self._inflight)

    def release_all(self) -> int:
        """Give back every job still claimed by this worker (used when it will not finish)."""
        with self._lock:
            ids = list(self._inflight)
            self._inflight.clear()
        if not ids:
            return 0
        with self.db.session() as s:
            return queue.release_own(s, ids, self.worker_id)

    def _heartbeat(self) -> None:
        # Runs until the worker thread has ended (it may still finish a batch after stop()).
        while True:
            stale = self.config().daemon.stale_claim_seconds
            if self._done.wait(max(0.5, min(10.0, stale / 4))):
                return
            ids = self.inflight()
            if ids:
                try:
                    with self.db.session() as s:
                        jobs.heartbeat(s, ids, self.worker_id)
                except Exception as exc:  # the next beat tries again
                    log.warning("heartbeat failed: %s", exc)

    # ------------------------------------------------------------------ main loop
    def _limit(self) -> int:
        cfg = self.config()
        return max(1, cfg.daemon.batch_size // max(1, cfg.model.max_windows))

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("worker crashed")
            raise
        finally:
            self._done.set()

    def _release_when_idle(self, idle_since: float, release_after: float) -> None:
        """After ``release_after`` idle seconds, hand the model's and decode processes' memory back
        (once: a released classifier has nothing left to release until it works again)."""
        if release_after <= 0 or time.monotonic() - idle_since < release_after or self.library.classifier is None:
            return
        if self.library.classifier.release():
            log.info("idle for %.0f s: stopped the decode processes and released the model's memory (back on the next file)", release_after)

    def _loop(self) -> None:
        first_ready: float | None = None
        idle_since: float | None = time.monotonic()
        while not self._stop.is_set():
            cfg = self.config().daemon
            try:
                with self.db.session(write=False) as s:
                    ready = queue.ready_count(s)
                    nxt = None if ready else queue.next_due(s)
            except Exception as exc:
                log.warning("reading the queue failed: %s", exc)
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            if not ready:
                first_ready = None
                if idle_since is None:
                    idle_since = time.monotonic()
                self._release_when_idle(idle_since, cfg.idle_release)
                timeout = 1.0
                if nxt is not None:
                    timeout = min(1.0, max(0.01, (nxt - utcnow()).total_seconds()))
                self.wake.wait(timeout)
                self.wake.clear()
                continue
            now = time.monotonic()
            if first_ready is None:
                first_ready = now
            limit = self._limit()
            if ready < limit and now - first_ready < cfg.max_wait and self.settling_soon(cfg.max_wait - (now - first_ready)):
                self.wake.wait(min(0.1, cfg.max_wait))
                self.wake.clear()
                continue
            if self._stop.is_set():
                break  # stop() came while this pass read the queue: claim nothing new
            first_ready = None
            idle_since = None
            try:
                with self.db.session() as s:
                    batch = jobs.claim(s, self.worker_id, limit)
            except Exception as exc:
                log.warning("claiming jobs failed: %s", exc)
                self.wake.wait(1.0)
                continue
            if batch:
                try:
                    self._run_batch(batch)
                except Exception:  # the database failed us: claims go stale and are re-run
                    log.exception("batch bookkeeping failed")
                    self.wake.wait(1.0)

    def _run_batch(self, batch: list[Job]) -> None:
        with self._lock:
            self._inflight = {j.id: j for j in batch}
        self.batches += 1
        log.debug("batch %d: %d jobs", self.batches, len(batch))
        try:
            for job in batch:
                if job.kind != "classify" and not self._stopping():
                    self._simple(job)
            todo = [j for j in batch if j.kind == "classify"]
            if todo and not self._stopping():
                self._classify(todo)
        except Exception as exc:
            if self.library.classifier is not None:
                self.library.classifier.close()  # a broken decode pool is rebuilt on next use
            if self._stop.is_set():
                # e.g. Ctrl-C reached the decode processes too: not the files' fault
                log.info("batch interrupted while stopping: %s", exc)
            else:
                log.exception("batch failed")
                for job in self._leftover():
                    self._finish(job, error=f"{type(exc).__name__}: {exc}")
        finally:
            left = self._leftover()
            if left:
                with self.db.session() as s:
                    n = queue.release_own(s, [j.id for j in left], self.worker_id)
                log.info("gave back %d unfinished jobs to the queue", n)
            with self._lock:
                self._inflight = {}

    def _stopping(self) -> bool:
        return self._stop.is_set() and time.monotonic() >= self._deadline

    def _leftover(self) -> list[Job]:
        with self._lock:
            return list(self._inflight.values())

    def _finish(self, job: Job, *, error: str | None = None, again_in: float | None = None) -> str | None:
        """complete / fail / re-queue (``again_in`` seconds from now) one claimed job."""
        cfg = self.config().daemon
        with self.db.session() as s:
            if again_in is not None:
                # enqueue on a claimed job moves its not_before past claimed_at, so
                # complete() puts it back in the queue (attempts reset) instead of done.
                jobs.enqueue(s, job.path, job.kind, dest=job.dest_path, delay=again_in)
            if error is None:
                state = jobs.complete(s, job.id, worker_id=self.worker_id)
            else:
                state = jobs.fail(s, job.id, error, max_attempts=cfg.max_attempts, backoff_base=cfg.backoff_base, worker_id=self.worker_id)
                if state == JOB_FAILED and job.kind == "classify" and os.path.isabs(job.path):
                    repo.mark_failed(s, job.path, error)
        with self._lock:
            self._inflight.pop(job.id, None)
        if error is not None:
            if state == JOB_FAILED:
                log.warning("failed %s: %s (gave up after %d attempts)", job.path, error, job.attempts)
            elif state is not None:
                delay = cfg.backoff_base * 2 ** max(0, job.attempts - 1)
                log.warning("failed %s: %s (attempt %d of %d, retrying in %s)", job.path, error, job.attempts, cfg.max_attempts, timedelta(seconds=round(delay)))
        return state

    # ------------------------------------------------------------------ move / delete
    def _simple(self, job: Job) -> None:
        try:
            if job.kind == "move":
                self._move(job)
            elif job.kind == "delete":
                wait = self._delete(job)
                if wait is not None:
                    self._finish(job, again_in=wait)
                    return
            # "rescan" jobs are run by the scheduler, not queued: nothing to do
        except Exception as exc:
            log.exception("%s job on %s", job.kind, job.path)
            self._finish(job, error=f"{type(exc).__name__}: {exc}")
            return
        self._finish(job)

    def _move(self, job: Job) -> None:
        src, dest = job.path, job.dest_path or ""
        n = 0
        with self.db.session() as s:
            if repo.get_track(s, src) is not None:
                repo.move_track(s, src, dest)
                n = 1
            else:
                for p, _ in queue.tracks_under(s, src):
                    repo.move_track(s, p, dest.rstrip("/") + p[len(src.rstrip("/")) :])
                    n += 1
        if n:
            log.info("moved %s -> %s%s", src, dest, f" ({n} tracks)" if n > 1 else "")
        # Whatever is at dest and differs from the database (a move that changed the file,
        # or a file never seen before) is queued as usual.
        cfg = self.config()
        filt = self.filter()
        if os.path.exists(dest):
            files = [f for f in walk([dest], include=cfg.library.include, exclude=cfg.library.exclude, follow_symlinks=cfg.library.follow_symlinks, on_swept=_swept) if filt.wanted(f.path)]
            with self.db.session(write=False) as s:
                known = queue.known_for(s, [f.path for f in files])
            todo, _ = Library.changed(files, known)
            if todo:
                enqueue_files(self.db, todo, cfg.daemon.settle_seconds)
                self.wake.set()

    def _delete(self, job: Job) -> float | None:
        """Mark the track(s) at ``job.path`` removed; returns seconds to wait instead.

        A file moved into a folder the moment that folder was created reaches us as a
        deletion plus a new file (inotify had no watch on the new folder yet). While new
        files are still settling or queued, a deletion waits, so that the new file's
        classify job can recognise the move first (:meth:`_match_moves`); it waits at
        most ``max(60 s, 10 x settle_seconds)``.
        """
        path = job.path
        settle = self.config().daemon.settle_seconds
        root = self.filter().root_of(path)
        if root is None or not self.root_present(root):
            log.info("not marking %s removed: its folder %s is not there (unmounted?)", path, root or "?")
            return None
        if os.path.lexists(path):
            return None  # it is back (the watcher settles it)
        age = (utcnow() - job.created_at).total_seconds() if job.created_at else 0.0
        if age < max(60.0, 10 * settle):
            if self.settling():
                return max(0.5, settle)
            with self.db.session(write=False) as s:
                if queue.live_count(s, "classify"):
                    return max(0.5, settle)
        n = 0
        with self.db.session() as s:
            track = repo.get_track(s, path)
            if track is not None:
                if track.status != TRACK_REMOVED:
                    repo.mark_removed(s, path)
                    n = 1
            else:
                for p, status in queue.tracks_under(s, path):
                    if status != TRACK_REMOVED and not os.path.lexists(p):
                        repo.mark_removed(s, p)
                        n += 1
        if n:
            log.info("deleted %s%s: marked removed", path, f" ({n} tracks)" if n > 1 else "")
        return None

    def _match_moves(self, new: list[FileStat]) -> list[str]:
        """New paths that are tracks about to be marked deleted, moved: same size and mtime,
        old path gone. Re-keys them (no re-classifying); returns the new paths."""
        with self.db.session(write=False) as s:
            gone = [g for g in queue.pending_deletions(s) if not os.path.lexists(g[0])]
        if not gone:
            return []
        old_keys = Counter((size, mtime) for _, size, mtime in gone)
        new_keys = Counter((f.size, f.mtime) for f in new)
        old_by_key = {(size, mtime): p for p, size, mtime in gone if old_keys[(size, mtime)] == 1}
        pairs = [(old_by_key[(f.size, f.mtime)], f.path) for f in new if new_keys[(f.size, f.mtime)] == 1 and (f.size, f.mtime) in old_by_key]
        if pairs:
            with self.db.session() as s:
                for old, p in pairs:
                    repo.move_track(s, old, p)
            for old, p in pairs:
                log.info("moved %s -> %s", old, p)
        return [p for _, p in pairs]

    # ------------------------------------------------------------------ classify
    def _classify(self, batch: list[Job]) -> None:
        cfg = self.config().daemon
        filt = self.filter()
        now = time.time()
        stats: list[FileStat] = []
        by_path: dict[str, Job] = {}
        for job in batch:
            root = filt.root_of(job.path)
            if root is None:
                self._finish(job)  # its folder is no longer in the config
                continue
            if not self.root_present(root):
                self._finish(job)  # reconciled when the folder comes back
                continue
            try:
                st = os.stat(job.path)
            except OSError:
                self._finish(job)  # gone again; a delete / move job says what happened
                continue
            if not statmod.S_ISREG(st.st_mode):
                self._finish(job)
                continue
            age = now - st.st_mtime
            if 0 <= age < cfg.settle_seconds:
                self._finish(job, again_in=cfg.settle_seconds - age + 0.05)  # still being written
                continue
            if job.path in by_path:  # cannot happen (one live job per path), but be safe
                self._finish(job)
                continue
            stats.append(FileStat(job.path, st.st_size, st.st_mtime))
            by_path[job.path] = job
        if not stats:
            return
        with self.db.session(write=False) as s:
            known = queue.known_for(s, by_path)
        new = [f for f in stats if f.path not in known]
        if new:
            moved = self._match_moves(new)
            if moved:
                with self.db.session(write=False) as s:
                    known.update(queue.known_for(s, moved))
        retry = [f for f in stats if by_path[f.path].attempts > 1 and known.get(f.path, (0, 0.0, ""))[2] == TRACK_FAILED]
        retry_paths = {f.path for f in retry}
        todo, _ = Library.changed([f for f in stats if f.path not in retry_paths], known)
        todo += retry
        todo_paths = {f.path for f in todo}
        for f in stats:
            if f.path not in todo_paths:
                log.debug("unchanged since last time: %s", f.path)
                self._finish(by_path[f.path])
        if not todo:
            return
        clf = self.library.classifier
        cold = clf is not None and not clf.started

        def say_started() -> None:
            # Said before the first result is recorded, so the log reads in order.
            nonlocal cold
            if cold and clf is not None and clf.started:
                cold = False
                log.info("model started on %s", clf.device)

        gen = self.library.process(todo)
        try:
            for outcome in gen:
                say_started()
                job = by_path[outcome.path]
                if outcome.action == "failed":
                    self._finish(job, error=outcome.reason or "failed")
                elif outcome.action == "changed":
                    self._finish(job, again_in=cfg.settle_seconds)
                    log.info("changed while classifying, again later: %s", outcome.path)
                else:
                    self._finish(job)
                    _log_outcome(outcome)
                self.on_outcome(outcome)
                if self._stopping():
                    break
        finally:
            gen.close()
            say_started()


def _log_outcome(o: Outcome) -> None:
    if o.action == "tagged":
        before = f" (was {'; '.join(o.before)})" if o.before else ""
        log.info("tagged %s: %s (%.0f%%)%s", o.path, "; ".join(o.genres), 100 * (o.confidence or 0), before)
    else:
        log.info("%s %s%s", o.action, o.path, f": {o.reason}" if o.reason else "")


def _swept(path: str) -> None:
    log.warning("removed %s: a temporary copy left by an interrupted tagger", path)
