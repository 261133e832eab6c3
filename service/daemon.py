"""``tagger serve``: the daemon's lifecycle.

Start-up: open (and migrate) the database; take the daemon lock next to it (one daemon per
database); release the claims of a predecessor that died; load the model; start watching
every folder that is there; start the worker, the settler and the scheduler; queue a
reconciling scan of all folders (changes made while the daemon was down); then tell
systemd ``READY=1``.

Running: the main thread sleeps on signals. SIGTERM / SIGINT stop it; SIGHUP re-reads
``config.toml`` (folders added are watched and scanned, folders removed are no longer
watched; their tracks stay in the database). Every couple of seconds it checks that each
folder is still there: one that disappears (unmounted drive, NAS offline) is reported and
left alone, its tracks are *not* marked deleted; when it comes back it is watched again and
scanned. It sends ``WATCHDOG=1`` while the worker, settler and observers are alive, and
``STATUS=`` with the queue depth and rate.

Stopping: ``STOPPING=1``; the worker claims nothing more; the observers stop (no new work);
files still settling are queued (durably, to run once settled, so nothing is dropped); the
worker finishes its batch if it can within ``STOP_GRACE`` seconds and gives the rest back to
the queue; exit 0, all within ``STOP_BOUND`` seconds (the units give ``TimeoutStopSec=30``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from tagger import quiet
from tagger.config import Config, ConfigError, load_config
from tagger.exits import EXIT_DB, EXIT_FAILURES, EXIT_OK, EXIT_USAGE
from tagger.library import FileStat, Library, Options, Outcome
from tagger.store import jobs
from tagger.store.db import Database, DatabaseLocked, open_db

from . import logs, queue
from .notify import Notifier
from .reconcile import reconcile
from .scheduler import Scheduler, cron_trigger
from .state import lock_path, state_path
from .watcher import EventHandler, PathFilter, Settler, Watcher
from .worker import Worker

log = logging.getLogger("tagger.daemon")

EXIT_FAILURE = EXIT_FAILURES  # status 1: the daemon stopped on an error
STOP_GRACE = 10.0  # the current batch may finish within this many seconds of SIGTERM
STOP_BOUND = 25.0  # the whole shutdown; then whatever is left is given back and we exit
PRESENCE_INTERVAL = 2.0  # seconds between checks that the watched folders are still there
STATUS_INTERVAL = 5.0
PURGE_DONE_AFTER = 7 * 24 * 3600.0


def normalize_roots(cfg: Config) -> list[str]:
    out: list[str] = []
    for p in cfg.folders():
        r = str(p.absolute()).rstrip("/") or "/"
        if r not in out:
            out.append(r)
    return out


def _options(cfg: Config, bundle) -> Options:
    """Tag options from the config; a learnt head's genres are written as it names them."""
    from tagger.model.head import written_names

    names = written_names(bundle, cfg.tags.names) if bundle is not None else None
    return Options.from_config(cfg, names=names)


class Daemon:
    def __init__(self, cfg: Config, *, notifier: Notifier | None = None):
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self._reload = threading.Event()
        self._check_now = threading.Event()
        self._wake = threading.Event()  # wakes the main loop (signals, a folder deleted)
        self.stop_reason = ""
        self.present: dict[str, bool] = {}
        self._was_mount: dict[str, bool] = {}
        self._done: deque[float] = deque(maxlen=100_000)
        self.done = 0
        self.failed = 0
        self.started = time.time()
        self.filter = PathFilter(cfg, normalize_roots(cfg))
        self.db: Database | None = None
        self.worker: Worker | None = None
        self.watcher: Watcher | None = None
        self.settler: Settler | None = None
        self.scheduler: Scheduler | None = None
        self.library: Library | None = None
        self._lock_fd: int | None = None
        self._state_written: dict[str, Any] | None = None

    # ================================================================== setup
    def run(self) -> int:
        self._install_signals()
        code = self._start()
        if code != EXIT_OK:
            self._cleanup()
            return code
        try:
            code = self._main_loop()
        finally:
            code = self._shutdown(code)
        return code

    def _install_signals(self) -> None:
        def stop(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_event.is_set():
                log.warning("%s again: exiting now", name)
                logging.shutdown()
                os._exit(EXIT_FAILURE)
            self.stop_reason = name
            self.stop_event.set()
            self._wake.set()

        def hup(signum, frame):
            self._reload.set()
            self._wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    def _start(self) -> int:
        cfg = self.cfg
        try:
            cron_trigger(cfg.daemon.rescan_cron)
        except ConfigError as exc:
            log.error("configuration: %s", exc)
            return EXIT_USAGE
        db_path = cfg.database.resolved()
        try:
            self.db = open_db(db_path, busy_timeout=cfg.database.busy_timeout)
        except DatabaseLocked as exc:
            log.error("%s", exc)
            return EXIT_DB
        except Exception as exc:
            log.error("database %s: %s", db_path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return EXIT_DB
        other = self._take_lock(self.db.path)
        if other is not None:
            log.error("another tagger serve (pid %s) is already running on %s", other, self.db.path)
            return EXIT_DB
        with self.db.session() as s:
            n = queue.release_dead_claims(s, max_attempts=cfg.daemon.max_attempts)
        if n:
            log.info("released %d jobs claimed by a daemon that is no longer running", n)

        try:
            self.library = self._load_model()
        except Exception as exc:
            log.error("cannot load the model: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return EXIT_USAGE

        self.settler = Settler(cfg.daemon.settle_seconds, self._on_settled)
        handler = EventHandler(self.filter, self.settler, self._enqueue, self._root_gone, delete_delay=cfg.daemon.settle_seconds)
        self.handler = handler
        self.watcher = Watcher(handler, cfg)
        self.worker = Worker(
            self.db,
            self.library,
            config=lambda: self.cfg,
            path_filter=lambda: self.filter,
            root_present=self.root_present,
            settling_soon=self.settler.busy_within,
            settling=self.settler.pending,
            on_outcome=self._on_outcome,
        )
        self.scheduler = Scheduler(rescan=lambda: self.reconcile(why="scheduled"), retry=self._retry_pump, upkeep=self._upkeep)

        self.watcher.start()
        for root in normalize_roots(cfg):
            self._init_root(root)
        self.settler.start()
        self.worker.start()
        self.scheduler.start(cfg)
        present = [r for r in normalize_roots(cfg) if self.present.get(r)]
        if present:
            self.scheduler.run_soon(self.reconcile, present, "start-up", id="reconcile:start")
        watching = len(self.watcher.watches)
        log.info("ready: watching %d of %d folders (worker %s)", watching, len(self.present), self.worker.worker_id)
        self.notifier.ready(self.status_line())
        self._write_state()
        return EXIT_OK

    def _load_model(self) -> Library:
        """The library over the configured model, which is checked now and started later.

        The bundle's records are read and checked here, so a wrong model path still stops
        the start-up with one line. The ONNX Runtime session and the decode processes
        start on the first file (as after an idle release): a daemon with nothing to do
        holds neither.
        """
        from tagger.model.head import load_any, make_classifier

        cfg = self.cfg
        # The decode processes die with the daemon, even after kill -9 (tagger.lifeline).
        bundle = load_any(cfg.model.path or None)  # a model bundle or learnt genres (a head)
        clf = make_classifier(bundle, batch_size=cfg.daemon.batch_size, max_windows=cfg.model.max_windows, workers=cfg.model.workers or None)
        log.info(
            "model %s (%s): %d genres, %d decode workers, batches of %d windows; started on the first file",
            bundle.name, bundle.sha256[:12], len(bundle.labels), clf.workers, clf.batch_size,
        )  # fmt: skip
        return Library(self.db, clf, _options(cfg, bundle))

    def _take_lock(self, db_path: Path) -> str | None:
        """Hold an exclusive lock next to the database; the pid of the holder if taken."""
        path = lock_path(db_path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        for _ in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.1)
        else:
            try:
                other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            return other
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return None

    # ================================================================== folders
    def root_present(self, root: str) -> bool:
        """Is the folder there now? A folder that was a mount point counts as gone when
        only the empty mount point is left (the drive was unmounted)."""
        try:
            if not os.path.isdir(root):
                return False
            return not self._was_mount.get(root) or os.path.ismount(root)
        except OSError:
            return False

    def _init_root(self, root: str) -> None:
        if os.path.isdir(root):
            self._was_mount[root] = os.path.ismount(root)
            self.present[root] = True
            self._watch(root)
        else:
            self.present[root] = False
            log.warning("%s is not there (not mounted yet?): it will be watched and scanned when it appears", root)

    def _watch(self, root: str) -> None:
        assert self.watcher is not None
        try:
            self.watcher.watch(root)
        except OSError as exc:  # even polling failed: it vanished between check and watch
            log.warning("cannot watch %s: %s", root, exc)

    def _root_gone(self, root: str) -> None:
        self._check_now.set()
        self._wake.set()

    def check_presence(self) -> None:
        assert self.watcher is not None and self.settler is not None and self.scheduler is not None
        for root in normalize_roots(self.cfg):
            now = self.root_present(root)
            before = self.present.get(root)
            if before and not now:
                self.present[root] = False
                self.watcher.unwatch(root)
                dropped = self.settler.forget_under(root)
                log.warning(
                    "%s is gone (unmounted, or the network share is offline?): stopped watching it; its tracks are left as they are until it is back%s",
                    root,
                    f" ({dropped} files that were settling will be found by the scan then)" if dropped else "",
                )
                self._write_state()
            elif before is False and now:
                self._was_mount[root] = os.path.ismount(root)
                self.present[root] = True
                self._watch(root)
                log.info("%s is back: watching it again and running a reconciling scan", root)
                self.scheduler.run_soon(self.reconcile, [root], "folder is back", id=f"reconcile:{root}")
                self._write_state()
        for root in self.watcher.dead_watches():
            if self.present.get(root) and self.root_present(root):
                self.watcher.fall_back(root, "its inotify watch stopped (watch limit reached?)")
                self.scheduler.run_soon(self.reconcile, [root], "watch replaced", id=f"reconcile:{root}")
                self._write_state()

    # ================================================================== work intake
    def _enqueue(self, path: str, kind: str, dest: str | None = None, delay: float = 0.0) -> None:
        assert self.db is not None and self.worker is not None
        with self.db.session() as s:
            jobs.enqueue(s, path, kind, dest=dest, delay=delay)
        log.debug("queued %s %s%s", kind, path, f" -> {dest}" if dest else "")
        if delay <= 0:
            self.worker.wake.set()

    def _on_settled(self, files: list[FileStat]) -> None:
        """Files the settler says are complete: queue those that differ from the database
        (our own tag writes were recorded with their new size and mtime: they do not)."""
        assert self.db is not None and self.worker is not None
        files = [f for f in files if self.filter.wanted(f.path)]
        if not files:
            return
        with self.db.session(write=False) as s:
            known = queue.known_for(s, [f.path for f in files])
        todo, unchanged = Library.changed(files, known)
        if unchanged:
            log.debug("%d settled files are as recorded (our own tag writes), not queued", unchanged)
        if not todo:
            return
        with self.db.session() as s:
            for f in todo:
                jobs.enqueue(s, f.path, "classify")
        log.debug("queued %d settled files", len(todo))
        self.worker.wake.set()

    def _on_outcome(self, o: Outcome) -> None:
        self._done.append(time.monotonic())
        if o.action == "failed":
            self.failed += 1
        else:
            self.done += 1

    # ================================================================== scheduled
    def reconcile(self, roots: list[str] | None = None, why: str = "scheduled") -> None:
        assert self.db is not None
        roots = [r for r in (roots or normalize_roots(self.cfg)) if r in self.filter.roots and self.root_present(r)]
        if not roots:
            return
        cfg = self.cfg
        try:
            res = reconcile(
                self.db, self.filter, roots, settle_seconds=cfg.daemon.settle_seconds,
                include=cfg.library.include, exclude=cfg.library.exclude, follow_symlinks=cfg.library.follow_symlinks,
            )  # fmt: skip
        except Exception:
            log.exception("reconciling scan of %s failed", ", ".join(roots))
            return
        log.info("reconciling scan (%s) of %s: %s", why, ", ".join(roots), res.summary())
        for p, why_bad in res.errors[:10]:
            log.warning("could not read %s: %s", p, why_bad)
        if res.queued and self.worker is not None:
            self.worker.wake.set()

    def _retry_pump(self) -> None:
        assert self.db is not None and self.worker is not None
        d = self.cfg.daemon
        with self.db.session() as s:
            n = jobs.release_stale(s, d.stale_claim_seconds, max_attempts=d.max_attempts)
            due = queue.ready_count(s)
        if n:
            log.warning("released %d jobs whose worker stopped sending heartbeats", n)
        if due:
            self.worker.wake.set()

    def _upkeep(self) -> None:
        assert self.db is not None
        try:
            with self.db.session() as s:
                purged = jobs.purge_finished(s, PURGE_DONE_AFTER)
            busy, wal, done = self.db.maintenance()
            log.info("database upkeep: WAL checkpoint %d/%d pages%s, optimized; %d old jobs purged", done, wal, " (readers busy)" if busy else "", purged)
        except Exception as exc:
            log.warning("database upkeep failed: %s", exc)

    # ================================================================== reload
    def reload(self) -> None:
        assert self.watcher is not None and self.settler is not None and self.scheduler is not None and self.library is not None
        self.notifier.reloading()
        old = self.cfg
        try:
            if old.source is None:
                raise ConfigError("no configuration file was read at start-up; nothing to reload")
            new = load_config(old.source)
            cron_trigger(new.daemon.rescan_cron)
        except ConfigError as exc:
            log.error("reload failed, keeping the configuration as it was: %s", exc)
            self.notifier.ready(self.status_line())
            return
        for what, a, b in (
            ("database.path", old.database.resolved(), new.database.resolved()),
            ("model.path", old.model.path, new.model.path),
            ("model.max_windows", old.model.max_windows, new.model.max_windows),
            ("model.workers", old.model.workers, new.model.workers),
            ("daemon.polling_interval", old.daemon.polling_interval, new.daemon.polling_interval),
        ):
            if a != b:
                log.warning("%s changed: takes effect on restart", what)
        new.database, new.model = old.database, old.model
        new.daemon.polling_interval = old.daemon.polling_interval
        old_roots, new_roots = normalize_roots(old), normalize_roots(new)
        rewatch = (old.daemon.observer, old.daemon.polling_folders) != (new.daemon.observer, new.daemon.polling_folders)
        self.cfg = new
        self.filter = PathFilter(new, new_roots)
        self.handler.filter = self.filter
        self.handler.delete_delay = new.daemon.settle_seconds
        self.settler.settle_seconds = new.daemon.settle_seconds
        self.watcher.cfg = new
        self.library.options = _options(new, self.library.classifier.bundle if self.library.classifier else None)
        if self.library.classifier is not None:
            self.library.classifier.batch_size = new.daemon.batch_size
        removed = [r for r in old_roots if r not in new_roots]
        added = [r for r in new_roots if r not in old_roots]
        for root in removed:
            self.watcher.unwatch(root)
            self.settler.forget_under(root)
            self.present.pop(root, None)
            log.info("no longer watching %s (its tracks stay in the database)", root)
        if rewatch:
            for root in [r for r in new_roots if r not in added and self.present.get(r)]:
                self.watcher.unwatch(root)
                self._watch(root)
        for root in added:
            self._init_root(root)
            if self.present.get(root):
                self.scheduler.run_soon(self.reconcile, [root], "folder added", id=f"reconcile:{root}")
        self.scheduler.reschedule(old, new)
        log.info("reloaded %s: %d folders (%d added, %d removed)", new.source, len(new_roots), len(added), len(removed))
        self._write_state()
        self.notifier.ready(self.status_line())

    # ================================================================== main loop
    def healthy(self) -> bool:
        assert self.worker is not None and self.settler is not None and self.watcher is not None
        return self.worker.alive() and self.settler.alive() and self.watcher.alive()

    def _main_loop(self) -> int:
        assert self.worker is not None
        last_presence = last_status = last_dog = time.monotonic()
        dog = self.notifier.watchdog_interval
        if dog:
            self.notifier.watchdog()
        while True:
            self._wake.wait(min(0.5, dog or 0.5))
            self._wake.clear()
            if self.stop_event.is_set():
                return EXIT_OK
            if self._reload.is_set():
                self._reload.clear()
                try:
                    self.reload()
                except Exception:
                    log.exception("reload failed")
            now = time.monotonic()
            if self._check_now.is_set() or now - last_presence >= PRESENCE_INTERVAL:
                self._check_now.clear()
                last_presence = now
                try:
                    self.check_presence()
                except Exception:
                    log.exception("folder check failed")
            if not self.worker.alive():
                log.error("the worker thread has died; exiting so that the service is restarted")
                self.stop_reason = "worker died"
                return EXIT_FAILURE
            if dog and now - last_dog >= dog:
                last_dog = now
                if self.healthy():
                    self.notifier.watchdog()
                else:
                    log.error("unhealthy (settler or observers stopped): not sending the watchdog ping")
            if now - last_status >= STATUS_INTERVAL:
                last_status = now
                try:
                    self.notifier.status(self.status_line())
                    self._write_state()
                except Exception as exc:
                    log.debug("status: %s", exc)

    # ================================================================== status
    def rate(self, window: float = 60.0) -> float:
        now = time.monotonic()
        span = min(window, max(1.0, time.time() - self.started))
        return sum(1 for t in self._done if now - t <= window) / span

    def status_line(self) -> str:
        depth = inflight = 0
        if self.db is not None:
            try:
                with self.db.session(write=False) as s:
                    st = jobs.queue_stats(s)
                depth, inflight = st["queued"], st["claimed"]
            except Exception:
                pass
        watching = len(self.watcher.watches) if self.watcher else 0
        gone = sum(1 for v in self.present.values() if not v)
        return (
            f"watching {watching} folder{'s' if watching != 1 else ''}{f' ({gone} gone)' if gone else ''}; "
            f"queue {depth}, {inflight} in flight; {self.rate():.2f} tracks/s; {self.done} done, {self.failed} failed"
        )

    def _write_state(self, running: bool = True) -> None:
        if self.db is None or self._lock_fd is None:
            return
        w = self.watcher.watches if self.watcher else {}
        lib = self.library
        state = {
            "pid": os.getpid(),
            "host": queue.HOST,
            "running": running,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "config": str(self.cfg.source) if self.cfg.source else None,
            "worker": self.worker.worker_id if self.worker else None,
            "model": {"name": lib.classifier.bundle.name, "sha256": lib.classifier.bundle.sha256} if lib and lib.classifier else None,
            "folders": [
                {"path": r, "present": bool(self.present.get(r)), "observer": w[r].mode if r in w else None, "reason": w[r].reason if r in w else ""}
                for r in normalize_roots(self.cfg)
            ],
            "next_rescan": (nr.isoformat() if (nr := self.scheduler.next_rescan() if self.scheduler else None) else None),
        }
        if state == self._state_written:
            return
        path = state_path(self.db.path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, path)
            self._state_written = state
        except OSError as exc:
            log.debug("state file: %s", exc)

    # ================================================================== shutdown
    def _shutdown(self, code: int) -> int:
        t0 = time.monotonic()
        reason = self.stop_reason or "error"
        log.info("stopping (%s)", reason)
        self.notifier.stopping(f"stopping ({reason})")
        if self.worker:
            # First: once the settler is flushed below, nothing looks "about to settle", and a
            # worker still claiming would start a fresh batch on the way out.
            self.worker.stop(grace=STOP_GRACE)
        if self.watcher:
            self.watcher.stop(timeout=3)
        if self.settler:
            self.settler.stop()
            self._flush_settling()
        if self.scheduler:
            self.scheduler.shutdown()
        if self.worker and not self.worker.join(max(1.0, STOP_BOUND - 5 - (time.monotonic() - t0))):
            n = self.worker.release_all()
            log.error("the worker did not finish in time: gave %d jobs back to the queue; exiting", n)
            self._write_state(running=False)
            logging.shutdown()
            os._exit(code)
        if self.library and self.library.classifier:
            closer = threading.Thread(target=self.library.classifier.close, daemon=True)
            closer.start()
            closer.join(max(1.0, STOP_BOUND - (time.monotonic() - t0)))
        try:
            if self.db is not None:
                with self.db.session(write=False) as s:
                    st = jobs.queue_stats(s)
                log.info("stopped: %d jobs queued for next time, %d done and %d failed in this run", st["queued"], self.done, self.failed)
        except Exception:
            pass
        self._write_state(running=False)
        self._cleanup()
        return code

    def _flush_settling(self) -> None:
        """Files still settling that differ from the database (not our own tag writes) are
        queued to run once settled, so a restart finds them even before its scan."""
        assert self.settler is not None and self.db is not None
        with self.settler._lock:
            paths = list(self.settler._cands)
            self.settler._cands.clear()
        if not paths:
            return
        try:
            files = []
            for p in paths:
                with contextlib.suppress(OSError):
                    st = os.stat(p)
                    files.append(FileStat(p, st.st_size, st.st_mtime))
            with self.db.session(write=False) as s:
                known = queue.known_for(s, [f.path for f in files])
            todo, _ = Library.changed(files, known)
            if todo:
                with self.db.session() as s:
                    for f in todo:
                        jobs.enqueue(s, f.path, "classify", delay=self.cfg.daemon.settle_seconds)
                log.info("queued %d files that were still settling", len(todo))
        except Exception as exc:
            log.warning("could not queue %d settling files (the next start-up scan finds them): %s", len(paths), exc)

    def _cleanup(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None
        if self.db is not None:
            self.db.dispose()
        self.notifier.close()


def serve(cfg: Config, *, verbose: int = 0) -> int:
    """Run the daemon in the foreground until SIGTERM / SIGINT; returns the exit status."""
    logs.setup(verbose)
    quiet.setup(verbose)  # the log holds the daemon's own lines, not its libraries' chatter
    if sys.platform != "linux":  # pragma: no cover
        log.warning("tagger serve is made for Linux (inotify, systemd); watching by polling may be all that works here")
    return Daemon(cfg).run()
