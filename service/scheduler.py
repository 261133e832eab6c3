"""Periodic work, with APScheduler 3 (a ``BackgroundScheduler``, jobs in memory: the
durable state is the job queue in the database, these are just timers).

``rescan``  the reconciling scan of all folders, on ``[daemon] rescan_cron`` (crontab
            syntax, local time; default nightly at 03:30)
``retry``   the retry pump: releases claims whose worker stopped heart-beating (hung or
            died on another host) and wakes the worker when failed jobs are due again
            (they were re-queued with exponential backoff by :func:`tagger.store.jobs.fail`)
``upkeep``  database upkeep every ``upkeep_minutes``: WAL checkpoint, ``PRAGMA optimize``,
            finished jobs older than a week purged (failed ones are kept)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from tagger.config import Config, ConfigError

log = logging.getLogger("tagger.schedule")


def cron_trigger(expr: str) -> CronTrigger:
    try:
        return CronTrigger.from_crontab(expr)
    except ValueError as exc:
        raise ConfigError(f"daemon.rescan_cron {expr!r}: {exc}") from None


class Scheduler:
    def __init__(self, rescan: Callable[[], None], retry: Callable[[], None], upkeep: Callable[[], None]):
        self._funcs = {"rescan": rescan, "retry": retry, "upkeep": upkeep}
        self.sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600})

    @staticmethod
    def _retry_seconds(cfg: Config) -> float:
        return max(1.0, min(60.0, cfg.daemon.stale_claim_seconds / 4, cfg.daemon.backoff_base))

    def start(self, cfg: Config) -> None:
        s = self.sched
        s.add_job(self._funcs["rescan"], cron_trigger(cfg.daemon.rescan_cron), id="rescan", name="reconciling scan")
        s.add_job(self._funcs["retry"], IntervalTrigger(seconds=self._retry_seconds(cfg)), id="retry", name="retry pump")
        s.add_job(self._funcs["upkeep"], IntervalTrigger(minutes=max(0.1, cfg.daemon.upkeep_minutes)), id="upkeep", name="database upkeep")
        s.start()
        nxt = s.get_job("rescan").next_run_time
        log.info("reconciling scan scheduled by %r, next at %s", cfg.daemon.rescan_cron, nxt.strftime("%Y-%m-%d %H:%M %Z") if nxt else "?")

    def reschedule(self, old: Config, new: Config) -> None:
        if old.daemon.rescan_cron != new.daemon.rescan_cron:
            self.sched.reschedule_job("rescan", trigger=cron_trigger(new.daemon.rescan_cron))
            log.info("reconciling scan now scheduled by %r", new.daemon.rescan_cron)
        if self._retry_seconds(old) != self._retry_seconds(new):
            self.sched.reschedule_job("retry", trigger=IntervalTrigger(seconds=self._retry_seconds(new)))
        if old.daemon.upkeep_minutes != new.daemon.upkeep_minutes:
            self.sched.reschedule_job("upkeep", trigger=IntervalTrigger(minutes=max(0.1, new.daemon.upkeep_minutes)))

    def run_soon(self, func: Callable[..., None], *args, id: str, name: str | None = None) -> None:
        """Run ``func(*args)`` once, now, in the scheduler's thread pool (a pending run with
        the same ``id`` is replaced)."""
        self.sched.add_job(func, "date", run_date=datetime.now().astimezone(), args=args, id=id, name=name or id, replace_existing=True)

    def next_rescan(self) -> datetime | None:
        job = self.sched.get_job("rescan")
        return job.next_run_time if job else None

    def shutdown(self) -> None:
        if self.sched.running:
            self.sched.shutdown(wait=False)
