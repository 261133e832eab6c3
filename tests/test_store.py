"""tagger.store on real SQLite files: migrations, pragmas, repository, job queue, locking."""

from __future__ import annotations

import sqlite3
import threading
import time
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, func, select, text

from tagger import store as S
from tagger.store.models import Job, utcnow

REPO = Path(__file__).resolve().parents[1]
TABLES = {"tracks", "models", "predictions", "tag_writes", "jobs", "embeddings"}


@pytest.fixture
def db(tmp_path: Path):
    database = S.open_db(tmp_path / "tagger.db")
    yield database
    database.dispose()


def _schema(path: Path) -> tuple[set[str], set[str]]:
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT type, name FROM sqlite_master").fetchall()
    finally:
        con.close()
    return {n for t, n in rows if t == "table"}, {n for t, n in rows if t == "view"}


# --------------------------------------------------------------------------- setup & migrations


def test_open_db_creates_file_migrates_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tagger.db"
    db = S.open_db(path, busy_timeout=2.5)
    try:
        assert path.is_file() and db.path == path
        assert S.current(path) == (S.head_revision(), S.head_revision())
        tables, views = _schema(path)
        assert TABLES | {"alembic_version"} <= tables
        assert "track_genres" in views
        con = sqlite3.connect(path)  # WAL is persistent: any client sees it
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.close()
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2500
        assert db.maintenance()[0] == 0  # checkpoint not blocked
    finally:
        db.dispose()


def test_schema_head_constant_is_the_newest_migration() -> None:
    from tagger.store.db import SCHEMA_HEAD

    assert S.head_revision() == SCHEMA_HEAD


def test_current_database_opens_without_alembic(tmp_path: Path) -> None:
    """A database already at head opens without importing Alembic (its 0.2 s of a
    one-file scan); one stamped with an older revision is still upgraded."""
    import subprocess
    import sys

    path = tmp_path / "t.db"
    S.upgrade(path)
    probe = (
        "import sys; from tagger.store import open_db; open_db(sys.argv[1]).dispose(); "
        "print('alembic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    S.downgrade(path, "0002")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    assert S.current(path)[0] == S.head_revision()


def test_models_match_migrated_schema(db: S.Database) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), S.Base.metadata
        )
    assert diff == []
    with db.engine.connect() as conn:  # the comparison does see the tables
        assert compare_metadata(MigrationContext.configure(conn), MetaData())


def test_downgrade_to_base_and_up_again(db: S.Database) -> None:
    with db.session() as s:
        S.upsert_track(s, "/music/a.flac", size=1, mtime=1.0)
    db.dispose()
    assert S.downgrade(db.path, "base") is None
    tables, views = _schema(db.path)
    assert tables <= {"alembic_version"} and not views
    assert S.current(db.path) == (None, S.head_revision())
    assert S.upgrade(db.path) == S.head_revision()
    assert _schema(db.path)[0] >= TABLES
    S.downgrade(db.path, "base")
    db2 = S.open_db(db.path)  # any command upgrades an old database
    try:
        assert S.current(db.path)[0] == S.head_revision()
    finally:
        db2.dispose()


def test_0002_keeps_data_up_and_down(tmp_path: Path) -> None:
    """0001 -> 0002 adds tracks.tag_settings and tag_writes.raw_before (NULL: not settled,
    no raw record) and changes the view; going back drops them and keeps every row."""
    path = tmp_path / "t.db"
    S.upgrade(path, "0001")
    con = sqlite3.connect(path)
    con.execute(
        "INSERT INTO tracks (id, path, size, mtime, status, first_seen, last_scanned, updated_at) "
        "VALUES (1, '/m/a.flac', 1, 1.0, 'tagged', '2025-01-01', '2025-01-01', '2025-01-01')"
    )
    con.execute(
        "INSERT INTO tag_writes (track_id, written_at, policy, genres_before, genres_after, dry_run, restored) "
        "VALUES (1, '2025-01-01', 'keep', '[\"Pop\"]', '[\"Rock\"]', 0, 1)"
    )
    con.commit()
    old_view = con.execute("SELECT written_genres FROM track_genres").fetchone()[0]
    con.close()
    assert old_view == '["Pop"]'  # 0001 showed the restored value as written
    assert S.upgrade(path, "0002") == "0002"
    con = sqlite3.connect(path)
    try:
        assert con.execute("SELECT path, tag_settings FROM tracks").fetchall() == [("/m/a.flac", None)]
        assert con.execute("SELECT genres_after, raw_before FROM tag_writes").fetchall() == [('["Rock"]', None)]
        assert con.execute("SELECT written_genres FROM track_genres").fetchone()[0] is None
    finally:
        con.close()
    S.downgrade(path, "0001")
    con = sqlite3.connect(path)
    try:
        columns = {r[1] for r in con.execute("PRAGMA table_info(tracks)")}
        assert "tag_settings" not in columns and "path" in columns
        assert "raw_before" not in {r[1] for r in con.execute("PRAGMA table_info(tag_writes)")}
        assert con.execute("SELECT written_genres FROM track_genres").fetchone()[0] == '["Pop"]'
    finally:
        con.close()


def test_database_from_a_newer_tagger_is_refused(db: S.Database) -> None:
    with db.session() as s:
        s.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(S.SchemaTooNew, match="9999_future"):
        S.open_db(db.path)


def test_current_of_missing_file_does_not_create_it(tmp_path: Path) -> None:
    assert S.current(tmp_path / "nope.db") == (None, S.head_revision())
    assert not (tmp_path / "nope.db").exists()


def test_migrations_ship_with_the_package() -> None:
    """migrations/ installs as tagger._migrations; packages are listed explicitly in
    pyproject.toml (see the comment there), so every tagger subpackage must be listed."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["tagger._migrations"] == "migrations"
    assert "script.py.mako" in setuptools["package-data"]["tagger._migrations"]
    listed = set(setuptools["packages"])
    on_disk = {
        ".".join(d.relative_to(REPO).parts)
        for d in [REPO / "tagger", *(REPO / "tagger").rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    }
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert {"tagger._migrations", "tagger._migrations.versions"} <= listed
    assert (S.migrations_dir() / "env.py").is_file()
    assert (S.migrations_dir() / "versions" / "0001_initial.py").is_file()


# --------------------------------------------------------------------------- tracks & view


def test_view_track_genres_joins_latest_prediction_and_write(db: S.Database) -> None:
    with db.session() as s:
        t = S.upsert_track(s, "/music/a.mp3", size=100, mtime=10.0, duration=180.0, format="mp3")
        S.upsert_track(s, "/music/b.mp3", size=5, mtime=1.0)
        m = S.ensure_model(s, "a" * 64, "densenet-v1", ["rock", "jazz"], {"acc": 0.8})
        assert S.ensure_model(s, "a" * 64, "other", ["x"]) == m
        S.record_prediction(s, t.id, m, {"rock": 0.2, "jazz": 0.8}, ["jazz"], 4)
        S.record_prediction(s, t.id, m, {"rock": 0.9, "jazz": 0.1}, ["rock"], 6)  # replaces
        S.record_tag_write(s, t.id, policy="replace", before=["Pop"], after=["Rock"], model_id=m)
        S.record_tag_write(s, t.id, policy="replace", before=["Rock"], after=["X"], dry_run=True)
        S.set_status(s, "/music/a.mp3", "tagged")
    with db.session(write=False) as s:
        assert s.scalar(select(func.count()).select_from(S.Prediction)) == 1
        rows = s.execute(text("SELECT * FROM track_genres ORDER BY path")).mappings().all()
        tw = S.last_tag_write(s, t.id)
        assert tw is not None and tw.genres_after == ["Rock"]
        assert S.last_tag_write(s, t.id, include_dry_run=True).dry_run is True
    a, b = rows
    assert a["path"] == "/music/a.mp3" and a["status"] == "tagged"
    assert (a["top_genre"], a["confidence"], a["predicted_genres"]) == ("rock", 0.9, '["rock"]')
    assert a["written_genres"] == '["Rock"]'
    assert (a["model_sha256"], a["model_name"]) == ("a" * 64, "densenet-v1")
    assert a["last_scanned"] is not None
    assert b["top_genre"] is None and b["written_genres"] is None and b["status"] == "pending"
    with db.session() as s:
        S.mark_restored(s, tw.id)
    sql = text("SELECT written_genres, written_at FROM track_genres WHERE track_id = :i")
    with db.session(write=False) as s:
        # Restored: nothing tagger wrote is in the file any more.
        assert tuple(s.execute(sql, {"i": t.id}).one()) == (None, None)
    with db.session() as s:
        S.record_tag_write(s, t.id, policy="restore", before=["Rock"], after=["Pop"])
    with db.session(write=False) as s:
        assert tuple(s.execute(sql, {"i": t.id}).one()) == (None, None)


def test_tracks_upsert_known_files_and_lifecycle(db: S.Database) -> None:
    with db.session() as s:
        t = S.upsert_track(s, "/m/a.ogg", size=10, mtime=1.5)
        S.upsert_track(s, "/m/b.ogg", size=20, mtime=2.5, status="tagged")
        t.content_hash = "h"
    with db.session(write=False) as s:
        assert S.known_files(s) == {
            "/m/a.ogg": (10, 1.5, "pending"),
            "/m/b.ogg": (20, 2.5, "tagged"),
        }
    with db.session() as s:
        b = S.upsert_track(s, "/m/b.ogg", size=20, mtime=2.5)  # unchanged: status kept
        assert b.status == "tagged"
        b = S.upsert_track(s, "/m/b.ogg", size=21, mtime=3.0)  # changed: back to pending
        assert b.status == "pending" and b.size == 21
        S.mark_failed(s, "/m/a.ogg", "decode error")
        f = S.mark_failed(s, "/m/never-scanned.ogg", "boom")
        assert (f.status, f.size) == ("failed", 0)
        assert S.move_track(s, "/m/a.ogg", "/m/sub/a.ogg") is not None
        assert S.mark_removed(s, "/m/b.ogg") and not S.mark_removed(s, "/m/zzz.ogg")
        assert S.mark_missing(s, ["/m/never-scanned.ogg"]) == 1
        S.mark_scanned(s, ["/m/sub/a.ogg"])
        with pytest.raises(ValueError):
            S.upsert_track(s, "relative.ogg", size=1, mtime=1)
    with db.session(write=False) as s:
        files = S.known_files(s)
        assert files["/m/sub/a.ogg"] == (10, 1.5, "failed")
        assert files["/m/b.ogg"][2] == "removed"
        assert files["/m/never-scanned.ogg"][2] == "missing"
        moved = S.get_track(s, "/m/sub/a.ogg")
        assert moved is not None and moved.id == t.id and moved.last_error == "decode error"


def test_known_files_is_fast_for_100k_tracks(db: S.Database) -> None:
    n = 100_000
    with db.session() as s:  # generated inside SQLite: fast to set up
        s.execute(
            text(
                "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i < :last) "
                "INSERT INTO tracks (path, size, mtime, status, first_seen, last_scanned, "
                "updated_at) SELECT printf('/music/%06d.mp3', i), i, i * 1.0, 'tagged', "
                ":now, :now, :now FROM c"
            ),
            {"last": n - 1, "now": str(utcnow())},
        )
    with db.session(write=False) as s:
        t0 = time.perf_counter()
        files = S.known_files(s)
        elapsed = time.perf_counter() - t0
    assert len(files) == n and files["/music/000042.mp3"] == (42, 42.0, "tagged")
    assert elapsed < 1.0, f"known_files took {elapsed:.2f}s for {n} rows"


def test_unsettled_lists_tracks_decided_under_other_settings(db: S.Database) -> None:
    from tagger.store import repo

    cases = {
        "/m/same.flac": ("tagged", "s1"),
        "/m/other.flac": ("kept", "s0"),
        "/m/dry-run.flac": ("classified", None),
        "/m/restored.flac": ("classified", "restored"),
        "/m/failed.flac": ("failed", None),  # nothing to apply: classified again when it changes
        "/m/pending.flac": ("pending", None),
    }
    with db.session() as s:
        for path, (status, settings) in cases.items():
            S.upsert_track(s, path, size=1, mtime=1.0, status=status)
            repo.set_tag_settings(s, path, settings)
    with db.session(write=False) as s:
        assert repo.unsettled(s, "s1") == {"/m/other.flac", "/m/dry-run.flac"}
        assert repo.unsettled(s, "s0") == {"/m/same.flac", "/m/dry-run.flac"}


# --------------------------------------------------------------------------- job queue


def test_enqueue_is_idempotent_for_live_jobs(db: S.Database) -> None:
    now = utcnow()
    with db.session() as s:
        j1 = S.enqueue(s, "/m/a.mp3", "classify", delay=5, now=now)
        j2 = S.enqueue(s, "/m/a.mp3", "classify", delay=30, now=now)
        j3 = S.enqueue(s, "/m/a.mp3", "move", dest="/m/b.mp3", now=now)
        assert j1 == j2 != j3
        assert s.get(Job, j1, populate_existing=True).not_before == now + timedelta(seconds=30)
        assert s.scalar(select(func.count()).select_from(Job)) == 2
        with pytest.raises(ValueError):
            S.enqueue(s, "/m/a.mp3", "move")  # no dest
        assert S.claim(s, "w:1", 10, now=now) == [s.get(Job, j3)]  # classify not due yet
        assert S.complete(s, j3, worker_id="w:1") == "done"
        # a finished job is not live: enqueueing again makes a new one
        assert S.enqueue(s, "/m/a.mp3", "move", dest="/m/c.mp3", now=now) not in (j1, j3)
        assert S.queue_stats(s, now=now) == {
            "queued": 2,
            "claimed": 0,
            "done": 1,
            "failed": 0,
            "ready": 1,
            "delayed": 1,
        }


def test_enqueue_while_claimed_requeues_on_complete(db: S.Database) -> None:
    now = utcnow()
    with db.session() as s:
        jid = S.enqueue(s, "/m/a.mp3", "classify", now=now)
        [job] = S.claim(s, "w:1", now=now)
        assert S.enqueue(s, "/m/a.mp3", "classify", now=now + timedelta(seconds=1)) == jid
        assert S.complete(s, jid, now=now + timedelta(seconds=2)) == "queued"
        assert S.claim(s, "w:2", now=now + timedelta(seconds=3))[0].id == jid
        assert S.complete(s, jid, worker_id="w:1") is None  # not w:1's any more
        assert S.complete(s, jid, worker_id="w:2") == "done"


def test_claim_is_atomic_across_connections(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    first = S.open_db(path)
    with first.session() as s:
        for i in range(300):
            S.enqueue(s, f"/m/{i}.mp3", "classify")
    dbs = [first, S.open_db(path)]  # two engines = two independent connection pools
    claimed: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(k: int) -> None:
        try:
            start.wait()
            while True:
                with dbs[k % 2].session() as s:
                    jobs = S.claim(s, f"host:{k}", limit=7)
                    ids = [j.id for j in jobs]
                if not ids:
                    return
                claimed[k].extend(ids)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors, errors
        every = [i for ids in claimed for i in ids]
        assert len(every) == len(set(every)) == 300
        with first.session(write=False) as s:
            assert S.queue_stats(s)["claimed"] == 300
    finally:
        for d in dbs:
            d.dispose()


def test_fail_backs_off_exponentially_then_fails(db: S.Database) -> None:
    t0 = utcnow()
    with db.session() as s:
        jid = S.enqueue(s, "/m/x.mp3", "classify", now=t0)
        now = t0
        for attempt, delay in [(1, 10), (2, 20)]:
            [job] = S.claim(s, "w:1", now=now)
            assert job.attempts == attempt
            assert S.fail(s, jid, "boom", max_attempts=3, backoff_base=10, now=now) == "queued"
            job = s.get(Job, jid, populate_existing=True)
            assert job.not_before == now + timedelta(seconds=delay) and job.claimed_by is None
            assert S.claim(s, "w:1", now=job.not_before - timedelta(seconds=1)) == []
            now = job.not_before
        S.claim(s, "w:1", now=now)
        assert S.fail(s, jid, "final", max_attempts=3, backoff_base=10, now=now) == "failed"
        job = s.get(Job, jid, populate_existing=True)
        assert (job.state, job.attempts, job.last_error) == ("failed", 3, "final")
        assert job.finished_at == now
        assert S.fail(s, jid, "again") is None  # not claimed any more


def test_release_stale_requeues_dead_workers_jobs(db: S.Database) -> None:
    t0 = utcnow()
    with db.session() as s:
        a = S.enqueue(s, "/m/a.mp3", "classify", now=t0)
        b = S.enqueue(s, "/m/b.mp3", "classify", now=t0)
        S.claim(s, "dead:1", limit=2, now=t0)
        later = t0 + timedelta(seconds=100)
        assert S.heartbeat(s, [b], "dead:1", now=later) == 1  # b's worker is alive
        assert S.release_stale(s, 60, now=later) == 1
        assert s.get(Job, a).state == "queued" and s.get(Job, a).claimed_by is None
        assert s.get(Job, b).state == "claimed"
        [again] = S.claim(s, "w:2", now=later)
        assert again.id == a and again.attempts == 2
        # with max_attempts, a job that keeps losing its worker ends up failed
        assert S.release_stale(s, 60, max_attempts=2, now=later + timedelta(seconds=300)) == 2
        assert s.get(Job, a).state == "failed" and s.get(Job, b).state == "queued"
        s.execute(text("UPDATE jobs SET finished_at = :t"), {"t": t0})
        assert S.purge_finished(s, 10, states=("failed",), now=later) == 1


# --------------------------------------------------------------------------- locking


def test_locked_database_waits_then_raises_database_locked(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    S.open_db(path).dispose()
    db = S.open_db(path, busy_timeout=0.5)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.perf_counter()
        with pytest.raises(S.DatabaseLocked) as info, db.session() as s:
            S.upsert_track(s, "/m/a.mp3", size=1, mtime=1.0)
        waited = time.perf_counter() - t0
        assert 0.4 <= waited < 5, waited
        msg = str(info.value)
        assert "locked" in msg and str(path) in msg and "\n" not in msg
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with db.session() as s:  # and works again once the lock is gone
        S.upsert_track(s, "/m/a.mp3", size=1, mtime=1.0)
    db.dispose()
