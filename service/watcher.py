"""Watching the library folders: observers, the path filter and the settler.

* :class:`Watcher` watches each folder with inotify, or with watchdog's polling observer
  where inotify cannot work: a network file system (NFS, SMB, sshfs, ...: inotify sees
  only this machine's changes), a folder named in ``[daemon] polling_folders`` or
  ``observer = "polling"``, or an inotify watch that fails (watch limit reached). The log
  says which folder is watched how, and why.
* :class:`PathFilter` decides which paths are music the daemon cares about: the same
  rules as ``tagger scan`` (supported extension, no hidden or system folders,
  ``[library] include/exclude``) plus ``[daemon] ignore_patterns``, the temporary names
  of copy and download tools, ignored until the file is renamed.
* :class:`Settler` holds candidate files until their size and mtime have been stable for
  ``settle_seconds`` *and* nothing else in their folder has changed for as long (so an
  album being copied is queued when the copy is over, not track by track), then hands
  them on in one list.
* :class:`EventHandler` turns watchdog events into settler calls and queue jobs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.polling import PollingObserver

from tagger import tags
from tagger.config import Config
from tagger.library import SYSTEM_NAMES, FileStat

log = logging.getLogger("tagger.watch")

#: Suffix of the temporary copy tagger writes tags into before renaming it over the file.
OWN_TMP_SUFFIX = ".tagger-tmp"

#: File systems where inotify only sees changes made by this machine.
NETWORK_FS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
        "lustre", "gpfs", "beegfs", "davfs", "fuse.sshfs", "sshfs", "fuse.rclone", "fuse.s3fs",
        "fuse.glusterfs", "fuse.cephfs", "fuse.davfs2", "fuse.gvfsd-fuse", "fuse.smbnetfs",
    }
)  # fmt: skip

#: The events the daemon listens to (open / close-without-write are our own reads).
EVENT_FILTER = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileAttribEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


def fs_type(path: str | Path) -> str | None:
    """The file-system type of the mount ``path`` is on, from /proc/self/mountinfo."""
    try:
        real = os.path.realpath(path)
        best, kind = "", None
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mount = fields[4].replace("\\040", " ")
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, kind = mount, right.split()[0]
        return kind
    except OSError:
        return None


def _as_str(p: str | bytes) -> str:
    return os.fsdecode(p)


class PathFilter:
    """Which paths under which watched folder the daemon takes as music."""

    def __init__(self, cfg: Config, roots: Iterable[Path] | None = None):
        self.roots = sorted((str(Path(r).absolute()).rstrip("/") or "/" for r in (roots if roots is not None else cfg.folders())), key=len, reverse=True)
        self.include = tuple(cfg.library.include)
        self.exclude = tuple(cfg.library.exclude)
        self.ignore = tuple(cfg.daemon.ignore_patterns)

    def root_of(self, path: str) -> str | None:
        for r in self.roots:  # longest first: nested folders belong to the inner one
            if path == r or path.startswith(r.rstrip("/") + "/"):
                return r
        return None

    def is_temporary(self, name: str) -> bool:
        """A name copy/download tools use until the file is complete (or a hidden file)."""
        return name.endswith(OWN_TMP_SUFFIX) or any(fnmatch.fnmatch(name, p) for p in self.ignore)

    def wanted(self, path: str) -> bool:
        root = self.root_of(path)
        if root is None or path == root:
            return False
        rel = os.path.relpath(path, root)
        parts = rel.split(os.sep)
        if any(p.startswith(".") or p.lower() in SYSTEM_NAMES for p in parts):
            return False
        name = parts[-1]
        if self.is_temporary(name) or not tags.supported(name):
            return False
        if not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in self.exclude)

    def wanted_dir(self, path: str) -> bool:
        root = self.root_of(path)
        if root is None:
            return False
        rel = os.path.relpath(path, root)
        return rel == "." or not any(p.startswith(".") or p.lower() in SYSTEM_NAMES for p in rel.split(os.sep))


@dataclass
class _Candidate:
    size: int = -1
    mtime: float = -1.0
    changed_at: float = 0.0  # monotonic time of the last event or stat change


class Settler:
    """Candidate files waiting for their size and mtime to stop changing.

    ``touch(path)`` (an event) starts or restarts a file's wait; a background thread
    stats every candidate each ``tick`` and passes those stable for ``settle_seconds``,
    whose folder has also been quiet that long, to ``on_ready`` as :class:`FileStat`.
    A file waits for its folder at most ``folder_cap`` seconds (a folder that never goes
    quiet, say a download folder, does not hold back files that are long complete).
    Empty files are dropped (``touch`` then a later write brings them back).
    """

    def __init__(
        self,
        settle_seconds: float,
        on_ready: Callable[[list[FileStat]], None],
        *,
        tick: float | None = None,
        folder_cap: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settle_seconds = float(settle_seconds)
        self.on_ready = on_ready
        self.tick = tick if tick is not None else min(0.25, max(0.02, self.settle_seconds / 4))
        self.folder_cap = folder_cap if folder_cap is not None else max(60.0, 12 * self.settle_seconds)
        self.clock = clock
        self._cands: dict[str, _Candidate] = {}
        self._dirs: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- called from the observer threads
    def touch(self, path: str) -> None:
        now = self.clock()
        with self._lock:
            c = self._cands.get(path)
            if c is None:
                self._cands[path] = _Candidate(changed_at=now)
            else:
                c.changed_at = now
            self._dirs[os.path.dirname(path)] = now

    def activity(self, folder: str) -> None:
        """Something happened in ``folder`` (a temporary file grew, a file appeared)."""
        with self._lock:
            self._dirs[folder] = self.clock()

    def forget(self, path: str) -> bool:
        with self._lock:
            return self._cands.pop(path, None) is not None

    def forget_under(self, folder: str) -> int:
        prefix = folder.rstrip("/") + "/"
        with self._lock:
            gone = [p for p in self._cands if p.startswith(prefix)]
            for p in gone:
                del self._cands[p]
            return len(gone)

    def rename(self, src: str, dest: str) -> bool:
        """A candidate was renamed: it keeps waiting under its new name."""
        with self._lock:
            c = self._cands.pop(src, None)
            if c is None:
                return False
            c.changed_at = self.clock()
            self._cands[dest] = c
            return True

    def rename_under(self, src: str, dest: str) -> int:
        sp = src.rstrip("/") + "/"
        with self._lock:
            moved = [p for p in self._cands if p.startswith(sp)]
            for p in moved:
                self._cands[dest.rstrip("/") + "/" + p[len(sp) :]] = self._cands.pop(p)
            return len(moved)

    def pending(self) -> int:
        with self._lock:
            return len(self._cands)

    def busy_within(self, seconds: float) -> bool:
        """Whether some candidate may become ready within ``seconds``."""
        now = self.clock()
        with self._lock:
            return any(now - c.changed_at + seconds >= self.settle_seconds for c in self._cands.values())

    # -- the settling itself
    def check(self) -> list[FileStat]:
        """Stat every candidate once; return (and forget) those that have settled."""
        now = self.clock()
        with self._lock:
            items = list(self._cands.items())
            dirs = dict(self._dirs)
        ready: list[FileStat] = []
        drop: list[str] = []
        restat: dict[str, tuple[int, float]] = {}
        for path, c in items:
            try:
                st = os.stat(path)
            except OSError:
                drop.append(path)  # gone (deleted or renamed: its own event says what to do)
                continue
            if (st.st_size, st.st_mtime) != (c.size, c.mtime):
                restat[path] = (st.st_size, st.st_mtime)
                continue
            quiet = now - c.changed_at
            if quiet < self.settle_seconds:
                continue
            folder_quiet = now - dirs.get(os.path.dirname(path), float("-inf"))
            if folder_quiet < self.settle_seconds and quiet < self.folder_cap:
                continue
            if st.st_size == 0:
                drop.append(path)
                continue
            ready.append(FileStat(path, st.st_size, st.st_mtime))
        with self._lock:
            for path, (size, mtime) in restat.items():
                c = self._cands.get(path)
                if c is not None:
                    c.size, c.mtime, c.changed_at = size, mtime, now
            for path in drop:
                self._cands.pop(path, None)
            for f in ready:
                c = self._cands.get(f.path)
                if c is not None and (c.size, c.mtime) == (f.size, f.mtime) and now - c.changed_at >= self.settle_seconds:
                    del self._cands[f.path]
            ready = [f for f in ready if f.path not in self._cands]
            horizon = now - max(self.settle_seconds, 1.0) * 2
            for d in [d for d, t in self._dirs.items() if t < horizon]:
                del self._dirs[d]
        return ready

    def run(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                ready = self.check()
                if ready:
                    self.on_ready(ready)
            except Exception:  # never let the settler die: log and go on
                log.exception("settler")

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="settler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class EventHandler(FileSystemEventHandler):
    """watchdog events → settler / queue.

    ``enqueue(path, kind, dest=None, delay=0.0)`` writes a durable job; ``root_gone(root)``
    is told when a watched folder itself is deleted.
    """

    def __init__(
        self,
        filt: PathFilter,
        settler: Settler,
        enqueue: Callable[..., None],
        root_gone: Callable[[str], None],
        delete_delay: float,
    ):
        self.filter = filt
        self.settler = settler
        self.enqueue = enqueue
        self.root_gone = root_gone
        self.delete_delay = delete_delay

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:
            log.exception("handling %r", event)

    def _own(self, path: str) -> bool:
        return path.endswith(OWN_TMP_SUFFIX)

    def _dispatch(self, event: FileSystemEvent) -> None:
        f = self.filter
        src = _as_str(event.src_path)
        if isinstance(event, DirMovedEvent):
            dest = _as_str(event.dest_path)
            self.settler.activity(os.path.dirname(dest))
            if f.wanted_dir(dest) and f.root_of(dest) is not None:
                self.settler.rename_under(src, dest)
                self.enqueue(src, "move", dest=dest)
            else:  # moved out of the library (or into a hidden folder): gone from here
                self.settler.forget_under(src)
                self.enqueue(src, "delete", delay=self.delete_delay)
            return
        if isinstance(event, DirDeletedEvent):
            if src in f.roots:
                self.root_gone(src)
                return
            self.settler.forget_under(src)
            if f.wanted_dir(src):
                self.enqueue(src, "delete", delay=self.delete_delay)
            return
        if isinstance(event, DirCreatedEvent):
            self.settler.activity(os.path.dirname(src))
            return
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            dest = _as_str(event.dest_path)
            src_ok, dest_ok = f.wanted(src), f.wanted(dest)
            if not self._own(src):
                self.settler.activity(os.path.dirname(dest))
            if src_ok and dest_ok:
                # A rename or move inside the library: the database follows, no re-classifying.
                self.settler.rename(src, dest)
                self.enqueue(src, "move", dest=dest)
            elif dest_ok:
                # A temporary name became a real one (download finished), or tagger's own
                # tag write landed: settle it; the database tells whether it is new work.
                self.settler.touch(dest)
            elif src_ok:
                self.settler.forget(src)
                self.enqueue(src, "delete", delay=self.delete_delay)
            return
        if isinstance(event, FileDeletedEvent):
            if f.wanted(src):
                self.settler.forget(src)
                self.enqueue(src, "delete", delay=self.delete_delay)
            return
        # created / modified / closed-after-write / attributes (touch -m)
        if f.wanted(src):
            self.settler.touch(src)
        elif not self._own(src) and f.root_of(src) is not None:
            self.settler.activity(os.path.dirname(src))  # e.g. album.part growing


@dataclass
class Watch:
    root: str
    mode: str  # inotify | polling
    reason: str
    observer: object
    watch: object


class Watcher:
    """One inotify observer and one polling observer; each folder scheduled on one."""

    def __init__(self, handler: EventHandler, cfg: Config):
        from watchdog.observers import Observer

        self.handler = handler
        self.cfg = cfg
        self._inotify = Observer()
        self._polling = PollingObserver(timeout=cfg.daemon.polling_interval)
        self.watches: dict[str, Watch] = {}
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        self._inotify.start()
        self._polling.start()
        self._started = True

    def _choose(self, root: str) -> tuple[str, str]:
        d = self.cfg.daemon
        forced = {str(Path(os.path.expandvars(p)).expanduser().absolute()).rstrip("/") for p in d.polling_folders}
        if d.observer == "polling":
            return "polling", 'observer = "polling" in the config'
        if root in forced:
            return "polling", "listed in [daemon] polling_folders"
        if d.observer == "auto":
            kind = fs_type(root)
            if kind in NETWORK_FS:
                return "polling", f"{kind} network file system: inotify would miss changes made by other machines"
        return "inotify", ""

    def watch(self, root: str) -> Watch:
        with self._lock:
            if root in self.watches:
                return self.watches[root]
            mode, reason = self._choose(root)
            if mode == "inotify":
                try:
                    w = self._inotify.schedule(self.handler, root, recursive=True, event_filter=EVENT_FILTER)
                    entry = Watch(root, "inotify", "", self._inotify, w)
                    log.info("watching %s with inotify", root)
                    self.watches[root] = entry
                    return entry
                except OSError as exc:
                    reason = f"inotify failed ({exc.strerror or exc})"
            w = self._polling.schedule(self.handler, root, recursive=True)
            entry = Watch(root, "polling", reason, self._polling, w)
            log.warning("watching %s by polling every %gs: %s", root, self.cfg.daemon.polling_interval, reason)
            self.watches[root] = entry
            return entry

    def unwatch(self, root: str) -> bool:
        with self._lock:
            entry = self.watches.pop(root, None)
        if entry is None:
            return False
        with contextlib.suppress(KeyError, OSError, ValueError):
            entry.observer.unschedule(entry.watch)  # type: ignore[attr-defined]
        return True

    def dead_watches(self) -> list[str]:
        """Folders whose inotify emitter stopped on its own (e.g. the watch limit was hit
        when a new subfolder appeared): they need to be watched again (by polling)."""
        out: list[str] = []
        emitters = getattr(self._inotify, "_emitter_for_watch", None)  # watchdog internals
        if not isinstance(emitters, dict):
            return out
        with self._lock:
            for root, entry in self.watches.items():
                if entry.mode != "inotify":
                    continue
                em = emitters.get(entry.watch)
                if em is None or not em.is_alive():
                    out.append(root)
        return out

    def fall_back(self, root: str, reason: str) -> Watch:
        self.unwatch(root)
        with self._lock:
            w = self._polling.schedule(self.handler, root, recursive=True)
            entry = Watch(root, "polling", reason, self._polling, w)
            self.watches[root] = entry
        log.warning("watching %s by polling every %gs: %s", root, self.cfg.daemon.polling_interval, reason)
        return entry

    def alive(self) -> bool:
        return not self._started or (self._inotify.is_alive() and self._polling.is_alive())

    def stop(self, timeout: float = 5.0) -> None:
        for obs in (self._inotify, self._polling):
            with contextlib.suppress(Exception):  # stopping is best effort
                obs.stop()
        for obs in (self._inotify, self._polling):
            if obs.is_alive():
                obs.join(timeout)
