"""``tagger status``: what the daemon is doing, read from the database.

Everything comes from the database (WAL mode: reading never blocks the daemon) plus the
daemon's lock and state files next to it, so it works while ``tagger serve`` runs, after it
stopped, and from another user that can read the database.
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select

from tagger.store import jobs
from tagger.store.db import Database
from tagger.store.models import JOB_CLAIMED, JOB_DONE, Job, Track, utcnow

from .state import lock_path, state_path

RATE_WINDOWS = {"1m": 60, "5m": 300, "15m": 900}


def daemon_info(db_path: Path) -> dict[str, Any]:
    """``{"running": bool, ...state file...}``: running means the daemon lock is held."""
    info: dict[str, Any] = {"running": False}
    lp = lock_path(db_path)
    if lp.exists():
        try:
            fd = os.open(lp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                info["running"] = True
            finally:
                os.close(fd)
        except OSError:
            pass
    try:
        state = json.loads(state_path(db_path).read_text())
        state.pop("running", None)
        info.update(state)
    except (OSError, ValueError):
        pass
    if not info["running"]:
        info.pop("worker", None)
    return info


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat(sep=" ", timespec="seconds") + "Z" if dt else None


def collect(db: Database, *, errors: int = 10, now: datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    with db.session(write=False) as s:
        qs = jobs.queue_stats(s, now=now)
        by_kind = {k: n for k, n in s.execute(select(Job.kind, func.count()).where(Job.state.in_(("queued", "claimed"))).group_by(Job.kind))}
        inflight = [
            {"path": j.path, "kind": j.kind, "claimed_by": j.claimed_by, "claimed_at": _iso(j.claimed_at), "heartbeat": _iso(j.heartbeat), "attempts": j.attempts}
            for j in s.scalars(select(Job).where(Job.state == JOB_CLAIMED).order_by(Job.claimed_at).limit(20))
        ]
        retrying = int(s.scalar(select(func.count()).select_from(Job).where(Job.state == "queued", Job.attempts > 0, Job.last_error.is_not(None))) or 0)
        rates = {}
        for name, secs in RATE_WINDOWS.items():
            n = s.scalar(select(func.count()).select_from(Job).where(Job.state == JOB_DONE, Job.kind == "classify", Job.finished_at >= now - timedelta(seconds=secs)))
            rates[name] = {"tracks": int(n or 0), "per_second": round(int(n or 0) / secs, 3)}
        last_done = s.scalar(select(func.max(Job.finished_at)).where(Job.state == JOB_DONE))
        recent: list[dict[str, Any]] = []
        for j in s.scalars(select(Job).where(Job.last_error.is_not(None)).order_by(func.coalesce(Job.finished_at, Job.not_before).desc()).limit(errors)):
            recent.append({"at": _iso(j.finished_at or j.not_before), "path": j.path, "kind": j.kind, "state": j.state, "attempts": j.attempts, "error": j.last_error})
        for t in s.scalars(select(Track).where(Track.last_error.is_not(None), or_(Track.status == "failed", Track.status == "pending")).order_by(Track.updated_at.desc()).limit(errors)):
            if not any(r["path"] == t.path for r in recent):
                recent.append({"at": _iso(t.updated_at), "path": t.path, "kind": "track", "state": t.status, "attempts": None, "error": t.last_error})
        recent.sort(key=lambda r: r["at"] or "", reverse=True)
        tracks = {st: n for st, n in s.execute(select(Track.status, func.count()).group_by(Track.status))}
    return {
        "database": str(db.path),
        "daemon": daemon_info(db.path),
        "queue": {
            "depth": qs["queued"] + qs["claimed"],
            "queued": qs["queued"],
            "ready": qs["ready"],
            "delayed": qs["delayed"],
            "retrying": retrying,
            "in_flight": qs["claimed"],
            "by_kind": by_kind,
        },
        "done": qs["done"],
        "failed": qs["failed"],
        "rate": rates,
        "last_done": _iso(last_done),
        "in_flight": inflight,
        "recent_errors": recent[:errors],
        "tracks": tracks,
    }


def render(st: dict[str, Any]) -> str:
    d = st["daemon"]
    lines = []
    if d["running"]:
        lines.append(f"daemon: running, pid {d.get('pid', '?')} on {d.get('host', '?')} since {d.get('started', '?')}")
    else:
        lines.append("daemon: not running" + (f" (last pid {d['pid']})" if d.get("pid") else ""))
    for f in d.get("folders", []):
        how = f["observer"] or ("gone" if not f["present"] else "not watched")
        lines.append(f"  {f['path']}: {how}" + (f" ({f['reason']})" if f.get("reason") else ""))
    if d.get("next_rescan"):
        lines.append(f"  next reconciling scan {d['next_rescan']}")
    q = st["queue"]
    retry = f", {q['retrying']} of them to retry" if q["retrying"] else ""
    lines.append(f"queue: {q['depth']} ({q['ready']} ready, {q['delayed']} waiting{retry}), {q['in_flight']} in flight")
    lines.append(f"jobs: {st['done']} done, {st['failed']} failed")
    r = st["rate"]
    lines.append(
        "rate: " + ", ".join(f"{v['tracks']} tracks in the last {k} ({v['per_second']:.2f}/s)" for k, v in r.items()) + (f"; last done {st['last_done']}" if st["last_done"] else "")
    )
    if st["tracks"]:
        lines.append("tracks: " + ", ".join(f"{n} {k}" for k, n in sorted(st["tracks"].items(), key=lambda kv: -kv[1])))
    if st["in_flight"]:
        lines.append("in flight:")
        lines += [f"  {j['kind']} {j['path']} (claimed {j['claimed_at']} by {j['claimed_by']})" for j in st["in_flight"]]
    if st["recent_errors"]:
        lines.append("recent errors:")
        lines += [f"  {e['at']} {e['path']}: {e['error']} [{e['state']}]" for e in st["recent_errors"]]
    return "\n".join(lines) + "\n"
