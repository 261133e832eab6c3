"""File names that are not UTF-8 (issue "Trust" §1).

``caf\\xe9.flac`` from an old Windows or Samba copy is a Latin-1 name: Python sees
``'caf\\udce9.flac'``, which SQLite, a terminal and soundfile all refused, so the
first such file aborted ``tagger scan`` with a traceback. Real files with such
names (made here from bytes paths) must be walked, decoded (libsndfile and PyAV),
tagged, stored exactly, shown escaped, found by ``query --path`` and ``show``,
restored, and followed by the daemon when renamed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
from mutagen import File as MutagenFile

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "NO_COLOR": "1"}
ENV.pop("TAGGER_CONFIG", None)

CAFE = b"caf\xe9"  # Latin-1 "café": not UTF-8
BJORK = b"Bj\xf6rk"  # a folder with a Latin-1 name


def raw_rows(db: Path, sql: str, *params: object) -> list[tuple]:
    """Straight from sqlite3: a BLOB comes back as bytes, a TEXT as str."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def genres(path: bytes) -> list[str]:
    """The genre values in the file, read back with mutagen (any of our formats)."""
    f = MutagenFile(os.fsdecode(path))
    assert f is not None and f.tags is not None, path
    if "TCON" in f.tags:
        return list(f.tags["TCON"].text)
    return list(f.tags.get("genre", []))


# ----------------------------------------------------------------------------- in process


def test_display_parse_and_streams() -> None:
    from tagger import paths

    name = os.fsdecode(b"/m/" + CAFE + b"/\xc3\xbc.mp3")  # Latin-1 folder, UTF-8 "ü"
    assert paths.display(name) == "/m/caf\\xe9/ü.mp3"
    assert paths.parse(paths.display(name)) == name
    assert os.fsencode(paths.from_db(paths.to_db(name))) == b"/m/caf\xe9/\xc3\xbc.mp3"
    assert paths.to_db("/m/ü.mp3") == "/m/ü.mp3"  # UTF-8 names stay text
    assert paths.candidates("/m/a.mp3") == ["/m/a.mp3"]

    # stdout raises on a lone surrogate; once escaped it writes \xe9 and the rest as is
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    with pytest.raises(UnicodeEncodeError):
        stream.write(name)
        stream.flush()
    raw.seek(0), raw.truncate()
    paths.escape_streams(stream)
    stream.write(name + "\n")
    stream.flush()
    assert raw.getvalue() == b"/m/caf\\xe9/\xc3\xbc.mp3\n"


def test_store_keeps_names_exactly(tmp_path: Path) -> None:
    """Tracks, jobs, moves, folder prefixes and queries with names that are not UTF-8."""
    from tagger.queries import query_tracks, show_track
    from tagger.store import jobs, open_db, repo
    from tagger_service import queue

    db_path = tmp_path / "t.db"
    folder = os.fsdecode(b"/music/" + BJORK)
    latin = os.fsdecode(b"/music/" + BJORK + b"/" + CAFE + b".flac")
    literal = "/music/Bj\\xf6rk/caf\\xe9.flac"  # a UTF-8 name that looks like the display form
    plain = "/music/plain.flac"
    with open_db(db_path) as db:
        with db.session() as s:
            for p in (latin, literal, plain):
                repo.upsert_track(s, p, size=1, mtime=1.0)
            repo.mark_failed(s, latin, f"{latin}: cannot decode")
            jobs.enqueue(s, latin, "move", dest=os.fsdecode(b"/music/n\xe9w.flac"))
        with db.session(write=False) as s:
            assert set(repo.known_files(s)) == {latin, literal, plain}
            assert repo.get_track(s, latin).path == latin
            assert [p for p, _ in queue.tracks_under(s, folder)] == [latin]
        rows = dict(raw_rows(db_path, "SELECT path, typeof(path) FROM tracks"))
        assert rows == {b"/music/Bj\xf6rk/caf\xe9.flac": "blob", literal: "text", plain: "text"}
        err = raw_rows(db_path, "SELECT last_error FROM tracks WHERE typeof(path) = 'blob'")[0][0]
        assert err == "/music/Bj\\xf6rk/caf\\xe9.flac: cannot decode"
        assert raw_rows(db_path, "SELECT path, dest_path FROM jobs") == [(b"/music/Bj\xf6rk/caf\xe9.flac", b"/music/n\xe9w.flac")]

        # query --path: the bytes, or the escaped form query prints (which also names `literal`)
        assert [r["path"] for r in query_tracks(db, path_glob=os.fsdecode(b"*/" + CAFE + b"*"))] == [latin]
        assert {r["path"] for r in query_tracks(db, path_glob="*/caf\\xe9*")} == {latin, literal}
        assert [r["path"] for r in query_tracks(db)] == [literal, latin, plain]  # byte order
        # show: the exact name first, then what its escapes stand for
        assert show_track(db, literal)["path"] == literal
        assert show_track(db, latin)["path"] == latin
        assert show_track(db, "/music/Bj\\xf6rk/*") is None

        with db.session() as s:  # renamed to a UTF-8 name and back
            assert repo.move_track(s, latin, "/music/cafe.flac") is not None
            assert repo.move_track(s, "/music/cafe.flac", latin) is not None
        assert raw_rows(db_path, "SELECT count(*) FROM tracks WHERE path = ?", b"/music/Bj\xf6rk/caf\xe9.flac") == [(1,)]


# ----------------------------------------------------------------------------- tagger scan


def run(cfg: Path, *args: str | bytes, expect: int | None = 0) -> subprocess.CompletedProcess:
    """The real command; output as bytes, checked to be UTF-8 (names come out escaped,
    except in JSON, whose ``\\udcNN`` escapes keep the exact name)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tagger.cli", "--config", str(cfg), *args],
        cwd=ROOT, env=ENV, capture_output=True, timeout=300,
    )  # fmt: skip
    out, err = proc.stdout.decode(), proc.stderr.decode()  # strict: raises if not UTF-8
    shown = err if {"--json", "json"} & set(args) else out + err
    assert "Traceback" not in err and "\\udc" not in shown, err
    if expect is not None:
        assert proc.returncode == expect, f"{args} -> {proc.returncode}\n{out}\n{err}"
    return proc


def test_scan_query_show_restore(tiny_bundle: Path, ffmpeg: str, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    root = os.fsencode(lib)
    flac = root + b"/" + CAFE + b".flac"  # libsndfile
    mp3 = root + b"/" + BJORK + b"/d\xe9j\xe0.mp3"  # PyAV, in a folder that is not UTF-8 either
    plain = lib / "sub" / "plain.flac"
    broken = root + b"/br\xfbl\xe9.mp3"
    helpers.write_synth(tmp_path / "a.flac", 8.0)
    os.rename(tmp_path / "a.flac", flac)  # soundfile itself cannot write to such a name
    os.mkdir(root + b"/" + BJORK)
    helpers.run_ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=8", "-c:a", "libmp3lame", tmp_path / "b.mp3")
    os.rename(tmp_path / "b.mp3", mp3)
    helpers.write_synth(plain, 8.0, seed=1)
    with open(broken, "wb") as f:
        f.write(b"not audio at all" * 1000)
    db = tmp_path / "t.db"
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[model]\npath = "{tiny_bundle}"\nworkers = 1\nmax_windows = 1\n'
        f'[database]\npath = "{db}"\n[tags]\nmin_confidence = 0.0\n'
    )

    proc = run(cfg, "scan", str(lib), expect=1)  # 1: the broken file failed; the rest went on
    err = proc.stderr.decode()
    assert f"failed {lib}/br\\xfbl\\xe9.mp3: " in err, err
    assert "3 tagged" in proc.stdout.decode() and "1 failed" in proc.stdout.decode()
    stored = {as_bytes(p): (kind, status) for p, kind, status in raw_rows(db, "SELECT path, typeof(path), status FROM tracks")}
    assert stored == {
        flac: ("blob", "tagged"),
        mp3: ("blob", "tagged"),
        broken: ("blob", "failed"),
        os.fsencode(plain): ("text", "tagged"),
    }
    for p in (flac, mp3, os.fsencode(plain)):
        assert genres(p), f"{p!r} has no genre"
    assert sorted(os.listdir(root)) == sorted([BJORK, CAFE + b".flac", b"br\xfbl\xe9.mp3", b"sub"])  # no stray copies

    out = run(cfg, "query").stdout.decode()
    assert f"{lib}/caf\\xe9.flac" in out and f"{lib}/Bj\\xf6rk/d\\xe9j\\xe0.mp3" in out, out
    hits = run(cfg, "query", "--path", "*/Bj\\xf6rk/*", "--format", "csv").stdout.decode().splitlines()
    assert len(hits) == 2 and hits[1].startswith(f"{lib}/Bj\\xf6rk/d\\xe9j\\xe0.mp3,tagged,"), hits
    rows = json.loads(run(cfg, "query", "--path", b"*/" + CAFE + b"*", "--format", "json").stdout)
    assert [os.fsencode(r["path"]) for r in rows] == [flac]  # JSON keeps the exact name
    shown = run(cfg, "show", f"{lib}/caf\\xe9.flac").stdout.decode()
    assert shown.startswith(f"{lib}/caf\\xe9.flac\n  status tagged"), shown
    assert json.loads(run(cfg, "show", "--json", mp3).stdout)["status"] == "tagged"

    before = genres(mp3)
    out = run(cfg, "restore", flac).stdout.decode()
    assert out.startswith(f"restored       {lib}/caf\\xe9.flac"), out
    assert genres(flac) == [] and genres(mp3) == before
    run(cfg, "restore", f"{lib}/Bj\\xf6rk/d\\xe9j\\xe0.mp3")  # as query shows it
    assert genres(mp3) == []
    writes = raw_rows(db, "SELECT t.path, w.policy FROM tag_writes w JOIN tracks t ON t.id = w.track_id WHERE w.policy = 'restore'")
    assert sorted(as_bytes(p) for p, _ in writes) == sorted([flac, mp3])


# ----------------------------------------------------------------------------- the daemon


@pytest.mark.slow
def test_daemon_tags_and_follows_names_that_are_not_utf8(tiny_bundle: Path, tmp_path: Path) -> None:
    from test_daemon import Env, scalar, wait_until

    env = Env(tmp_path, tiny_bundle)
    try:
        tpl = helpers.write_synth(tmp_path / "tpl.flac", 6.0)
        d = env.start()
        music = os.fsencode(env.music)
        first = music + b"/" + CAFE + b".flac"
        shutil.copyfile(tpl, first)

        def path_status() -> dict[bytes, str]:
            rows = raw_rows(env.db, "SELECT path, status FROM tracks") if env.db.exists() else []
            return {as_bytes(p): s for p, s in rows}

        wait_until(lambda: path_status().get(first) == "tagged", 60, "caf\\xe9.flac tagged", proc=d)
        assert genres(first)

        # renamed into a new folder that is not UTF-8, then that folder renamed: followed,
        # never classified again
        os.mkdir(music + b"/" + BJORK)
        time.sleep(0.3)
        moved = music + b"/" + BJORK + b"/n\xe9w.flac"
        os.rename(first, moved)
        wait_until(lambda: path_status().get(moved) == "tagged", 30, "the rename followed", proc=d)
        os.rename(music + b"/" + BJORK, music + b"/" + BJORK + b"2")
        final = music + b"/" + BJORK + b"2/n\xe9w.flac"
        wait_until(lambda: set(path_status()) == {final}, 30, "the folder rename followed", proc=d)
        time.sleep(2)  # > settle_seconds: nothing queued again
        assert scalar(env.db, "SELECT count(*) FROM tag_writes") == 1
        assert scalar(env.db, "SELECT count(*) FROM predictions") == 1
        assert d.stop() == 0
        log = d.log.read_bytes().decode()  # strict: the log is UTF-8
        assert f"tagged {env.music}/caf\\xe9.flac" in log, log
        assert f"moved {env.music}/Bj\\xf6rk -> {env.music}/Bj\\xf6rk2" in log, log
        assert "Traceback" not in log and "\\udc" not in log, log
    finally:
        env.cleanup()
