"""Durable job queue for the daemon, in the ``jobs`` table.

Life of a job: ``queued`` --claim--> ``claimed`` --complete--> ``done``
                                              \\--fail--> ``queued`` (backoff) ... ``failed``.

* At most one *live* (queued or claimed) job per (path, kind), enforced by a partial unique
  index; :func:`enqueue` on a live job updates its ``not_before`` (debounce) instead.
* ``attempts`` counts claims, so a file that kills its worker (and comes back through
  :func:`release_stale`) also runs out of attempts.
* A job re-enqueued while it is claimed (the file changed again while being processed) is
  not lost: its ``not_before`` moves past ``claimed_at`` and :func:`complete` re-queues it.
* Claiming is one ``UPDATE ... WHERE id IN (SELECT ... LIMIT n) RETURNING`` statement inside
  a ``BEGIN IMMEDIATE`` transaction, so two workers never get the same job. Claim in a short
  session of its own, then do the work outside any transaction.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from .models import (
    JOB_CLAIMED,
    JOB_DONE,
    JOB_FAILED,
    JOB_KINDS,
    JOB_LIVE_STATES,
    JOB_QUEUED,
    JOB_STATES,
    Job,
    utcnow,
)

_LIVE_WHERE = text("state IN ('queued', 'claimed')")  # must match uq_jobs_live_path_kind


def enqueue(
    session: Session,
    path: str,
    kind: str,
    dest: str | None = None,
    delay: float = 0.0,
    *,
    now: datetime | None = None,
) -> int:
    """Queue ``kind`` work on ``path`` to run no earlier than ``delay`` seconds from now.

    Idempotent: if a live job exists for (path, kind), its ``not_before`` (and ``dest_path``)
    are updated instead, so a burst of file-system events becomes one job run after the last
    event + delay. Returns the job id.
    """
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r} (one of {', '.join(JOB_KINDS)})")
    if kind == "move" and not dest:
        raise ValueError("a move job needs dest")
    now = now or utcnow()
    not_before = now + timedelta(seconds=max(0.0, delay))
    stmt = sqlite_insert(Job).values(
        path=path,
        kind=kind,
        dest_path=dest,
        state=JOB_QUEUED,
        attempts=0,
        not_before=not_before,
        created_at=now,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[Job.path, Job.kind],
        index_where=_LIVE_WHERE,
        set_={"not_before": stmt.excluded.not_before, "dest_path": stmt.excluded.dest_path},
    ).returning(Job.id)
    return int(session.execute(stmt).scalar_one())


def claim(
    session: Session,
    worker_id: str,
    limit: int = 1,
    *,
    kinds: tuple[str, ...] | None = None,
    now: datetime | None = None,
) -> list[Job]:
    """Atomically take up to ``limit`` due jobs (oldest ``not_before`` first) for ``worker_id``
    (e.g. ``"host:pid"``)."""
    now = now or utcnow()
    due = (
        select(Job.id)
        .where(Job.state == JOB_QUEUED, Job.not_before <= now)
        .order_by(Job.not_before, Job.id)
        .limit(limit)
    )
    if kinds:
        due = due.where(Job.kind.in_(kinds))
    stmt = (
        update(Job)
        .where(Job.id.in_(due), Job.state == JOB_QUEUED)
        .values(
            state=JOB_CLAIMED,
            claimed_by=worker_id,
            claimed_at=now,
            heartbeat=now,
            attempts=Job.attempts + 1,
        )
        .returning(Job)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    jobs = list(session.scalars(stmt))
    jobs.sort(key=lambda j: (j.not_before, j.id))  # RETURNING order is unspecified
    return jobs


def heartbeat(
    session: Session, job_ids: list[int], worker_id: str, *, now: datetime | None = None
) -> int:
    """A worker says it is still alive on these jobs; returns how many are still its own."""
    if not job_ids:
        return 0
    result = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.state == JOB_CLAIMED, Job.claimed_by == worker_id)
        .values(heartbeat=now or utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _own(session: Session, job_id: int, worker_id: str | None) -> Job | None:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.state != JOB_CLAIMED:
        return None
    if worker_id is not None and job.claimed_by != worker_id:
        return None
    return job


def _requeue(job: Job, not_before: datetime) -> None:
    job.state = JOB_QUEUED
    job.not_before = not_before
    job.claimed_by = None
    job.claimed_at = None
    job.heartbeat = None


def complete(
    session: Session, job_id: int, *, worker_id: str | None = None, now: datetime | None = None
) -> str | None:
    """Mark a claimed job done; returns the new state.

    ``"queued"`` if the job was re-enqueued while it ran (it runs again, attempts reset);
    None if the job is not claimed (by ``worker_id``, when given), e.g. it was released as
    stale and someone else has it now.
    """
    now = now or utcnow()
    job = _own(session, job_id, worker_id)
    if job is None:
        return None
    if job.claimed_at is not None and job.not_before > job.claimed_at:
        _requeue(job, job.not_before)
        job.attempts = 0
    else:
        job.state = JOB_DONE
        job.finished_at = now
        job.last_error = None
    session.flush()
    return job.state


def fail(
    session: Session,
    job_id: int,
    error: str,
    *,
    max_attempts: int = 5,
    backoff_base: float = 30.0,
    worker_id: str | None = None,
    now: datetime | None = None,
) -> str | None:
    """Record a failed attempt: re-queue after ``backoff_base * 2**(attempts-1)`` seconds
    (base, 2*base, 4*base, ...) until ``attempts`` reaches ``max_attempts``, then ``failed``.
    Returns the new state, or None if the job is not claimed (by ``worker_id``)."""
    now = now or utcnow()
    job = _own(session, job_id, worker_id)
    if job is None:
        return None
    job.last_error = error
    if job.attempts >= max_attempts:
        job.state = JOB_FAILED
        job.finished_at = now
    else:
        delay = backoff_base * 2 ** max(0, job.attempts - 1)
        _requeue(job, now + timedelta(seconds=delay))
    session.flush()
    return job.state


def release_stale(
    session: Session,
    older_than_seconds: float,
    *,
    max_attempts: int | None = None,
    now: datetime | None = None,
) -> int:
    """Give back claimed jobs whose worker stopped heart-beating ``older_than_seconds`` ago
    (it died or hung): they are re-queued at once, or marked ``failed`` when ``max_attempts``
    is given and reached (a file that crashes workers). Returns how many were released."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=older_than_seconds)
    stale = (
        Job.state == JOB_CLAIMED,
        func.coalesce(Job.heartbeat, Job.claimed_at) < cutoff,
    )
    count = 0
    if max_attempts is not None:
        result = session.execute(
            update(Job)
            .where(*stale, Job.attempts >= max_attempts)
            .values(
                state=JOB_FAILED,
                finished_at=now,
                last_error=func.coalesce(Job.last_error, "worker lost (no heartbeat)"),
            )
            .execution_options(synchronize_session=False)
        )
        count += int(result.rowcount or 0)  # type: ignore[attr-defined]
    result = session.execute(
        update(Job)
        .where(*stale)
        .values(state=JOB_QUEUED, claimed_by=None, claimed_at=None, heartbeat=None, not_before=now)
        .execution_options(synchronize_session=False)
    )
    count += int(result.rowcount or 0)  # type: ignore[attr-defined]
    session.expire_all()
    return count


def queue_stats(session: Session, *, now: datetime | None = None) -> dict[str, int]:
    """Job counts by state, plus ``ready`` (queued and due now) and ``delayed``."""
    now = now or utcnow()
    stats = dict.fromkeys(JOB_STATES, 0)
    for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        stats[state] = n
    ready = session.scalar(
        select(func.count()).select_from(Job).where(Job.state == JOB_QUEUED, Job.not_before <= now)
    )
    stats["ready"] = int(ready or 0)
    stats["delayed"] = stats[JOB_QUEUED] - stats["ready"]
    return stats


def purge_finished(
    session: Session,
    older_than_seconds: float,
    *,
    states: tuple[str, ...] = (JOB_DONE,),
    now: datetime | None = None,
) -> int:
    """Delete finished jobs older than ``older_than_seconds`` so the table doesn't grow
    forever (failed ones are kept by default for inspection)."""
    if any(s in JOB_LIVE_STATES for s in states):
        raise ValueError("only finished jobs (done/failed) can be purged")
    cutoff = (now or utcnow()) - timedelta(seconds=older_than_seconds)
    result = session.execute(
        Job.__table__.delete().where(Job.state.in_(states), Job.finished_at < cutoff)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
