"""Job-queue helpers the daemon needs on top of :mod:`tagger.store.jobs`.

Worker ids are ``host:pid:token``: the host and pid let a restarted daemon release at
once the claims of a predecessor that died (``kill -9``, OOM, power loss) instead of
waiting ``stale_claim_seconds`` for its heartbeat to go stale; the random token tells a
new process that happens to get the old pid (pid 1 in a container) from the old one.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Text, cast, func, literal, or_, select, update
from sqlalchemy.orm import Session

from tagger.store.models import (
    JOB_CLAIMED,
    JOB_FAILED,
    JOB_LIVE_STATES,
    JOB_QUEUED,
    TRACK_REMOVED,
    FsPath,
    Job,
    Track,
    utcnow,
)

HOST = socket.gethostname()


def new_worker_id() -> str:
    return f"{HOST}:{os.getpid()}:{secrets.token_hex(3)}"


def parse_worker(worker_id: str | None) -> tuple[str, int] | None:
    """``(host, pid)`` of a worker id, or None if it is not one of ours."""
    if not worker_id:
        return None
    parts = worker_id.split(":")
    if len(parts) < 2:
        return None
    try:
        return parts[0], int(parts[1])
    except ValueError:
        return None


def pid_is_tagger(pid: int) -> bool:
    """Whether ``pid`` is alive and (where /proc tells) a tagger process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"tagger" in f.read()
    except OSError:
        return True


def release_dead_claims(session: Session, *, max_attempts: int, own_pid: int | None = None) -> int:
    """Re-queue jobs claimed by a daemon on this host that is no longer running.

    Called at start-up, before this process claims anything, so claims carrying our own
    pid are a predecessor's too. A job that has used up ``max_attempts`` claims (a file
    that keeps killing the daemon) is failed instead. Returns how many were released.
    """
    own_pid = os.getpid() if own_pid is None else own_pid
    dead: list[Job] = []
    for job in session.scalars(select(Job).where(Job.state == JOB_CLAIMED)):
        who = parse_worker(job.claimed_by)
        if who is None or who[0] != HOST:
            continue  # another host's: only its heartbeat going stale releases it
        if who[1] == own_pid or not pid_is_tagger(who[1]):
            dead.append(job)
    now = utcnow()
    for job in dead:
        if job.attempts >= max_attempts:
            job.state = JOB_FAILED
            job.finished_at = now
            job.last_error = job.last_error or f"the daemon died while working on it ({job.attempts} attempts)"
        else:
            job.state = JOB_QUEUED
            job.not_before = now
        job.claimed_by = job.claimed_at = job.heartbeat = None
    session.flush()
    return len(dead)


def release_own(session: Session, job_ids: Iterable[int], worker_id: str) -> int:
    """Give back jobs we claimed but did not run (shutdown): queued again at once, and the
    claim is not counted as an attempt."""
    ids = list(job_ids)
    if not ids:
        return 0
    result = session.execute(
        update(Job)
        .where(Job.id.in_(ids), Job.state == JOB_CLAIMED, Job.claimed_by == worker_id)
        .values(
            state=JOB_QUEUED,
            claimed_by=None,
            claimed_at=None,
            heartbeat=None,
            attempts=func.max(Job.attempts - 1, 0),
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def ready_count(session: Session, now: datetime | None = None) -> int:
    now = now or utcnow()
    n = session.scalar(select(func.count()).select_from(Job).where(Job.state == JOB_QUEUED, Job.not_before <= now))
    return int(n or 0)


def next_due(session: Session) -> datetime | None:
    """When the next queued job becomes due (None if the queue is empty)."""
    return session.scalar(select(func.min(Job.not_before)).where(Job.state == JOB_QUEUED))


def known_for(session: Session, paths: Iterable[str]) -> dict[str, tuple[int, float, str]]:
    """``{path: (size, mtime, status)}`` for those of ``paths`` in the database."""
    out: dict[str, tuple[int, float, str]] = {}
    paths = list(paths)
    for i in range(0, len(paths), 500):
        chunk = paths[i : i + 500]
        rows = session.execute(select(Track.path, Track.size, Track.mtime, Track.status).where(Track.path.in_(chunk)))
        out.update({p: (size, mtime, status) for p, size, mtime, status in rows})
    return out


def _under(prefix: str):
    # path LIKE 'prefix/%' with LIKE's wildcards escaped; compared as TEXT on both sides,
    # since SQLite's LIKE never matches a BLOB (a path that is not UTF-8, tagger.paths)
    esc = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = literal(esc.rstrip("/") + "/%", FsPath)
    return cast(Track.path, Text).like(cast(pattern, Text), escape="\\")


def tracks_under(session: Session, prefix: str) -> list[tuple[str, str]]:
    """``(path, status)`` of every track below the folder ``prefix``."""
    return [(p, s) for p, s in session.execute(select(Track.path, Track.status).where(_under(prefix)))]


def live_count(session: Session, kind: str) -> int:
    """Queued or claimed jobs of one kind."""
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.kind == kind, Job.state.in_(JOB_LIVE_STATES))) or 0)


def pending_deletions(session: Session, limit: int = 5000) -> list[tuple[str, int, float]]:
    """``(path, size, mtime)`` of the tracks that live ``delete`` jobs are about to mark
    removed (the job's path itself, or the tracks below it for a folder)."""
    out: list[tuple[str, int, float]] = []
    for p in session.scalars(select(Job.path).where(Job.kind == "delete", Job.state.in_(JOB_LIVE_STATES)).limit(limit)):
        rows = session.execute(select(Track.path, Track.size, Track.mtime).where(or_(Track.path == p, _under(p)), Track.status != TRACK_REMOVED))
        out.extend((path, size, mtime) for path, size, mtime in rows)
    return out


def live_paths(session: Session, kind: str, paths: Iterable[str]) -> set[str]:
    """Those of ``paths`` that have a queued or claimed job of ``kind``."""
    out: set[str] = set()
    paths = list(paths)
    for i in range(0, len(paths), 500):
        out.update(session.scalars(select(Job.path).where(Job.kind == kind, Job.state.in_(JOB_LIVE_STATES), Job.path.in_(paths[i : i + 500]))))
    return out
