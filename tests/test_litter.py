"""No temporary copies left in a person's folders (issue 19, "copies left behind").

A tag write works on a hidden ``.NAME.xxxxxxxx.tagger-tmp`` copy beside the file and
renames it over the original; a ``kill -9`` in between leaves the copy. The writer
holds a ``flock`` on its copy, so the next scan (or the daemon) can tell a copy being
written (locked: left alone) from one whose writer died (unlocked: deleted, and said).

* a live copy held by a real process survives a sweep; after ``kill -9`` of that
  process the next walk deletes it, and nothing else in the folder;
* a real ``tagger scan`` killed with ``kill -9`` in the middle of a write leaves a
  copy; the next scan removes it, says so, and ends with every file tagged once and
  its audio unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
from mutagen.id3 import APIC, ID3
from test_scan import ENV, ROOT, _config, excerpts, rows, scan, tagger  # noqa: F401  (excerpts: a fixture)

from tagger import tags
from tagger.library import walk


def _copies(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".tagger-tmp"))


def _mp3(src: Path, out: Path, art_mb: int = 0) -> Path:
    helpers.run_ffmpeg("-i", src, "-map_metadata", "-1", "-c:a", "libmp3lame", "-b:a", "64k", out)
    if art_mb:  # a big cover makes each copy take long enough to be caught mid-write
        t = ID3()
        t.add(APIC(encoding=3, mime="image/png", type=3, desc="cover", data=os.urandom(art_mb << 20)))
        t.save(out)
    return out


# The writer of a live copy: the real write path, held open in the middle of it.
_HOLD = """
import sys, time
from pathlib import Path
from tagger.tags import _replace_safely
def change(tmp):
    print(tmp, flush=True)
    time.sleep(600)
_replace_safely(Path(sys.argv[1]), change)
"""


def test_live_copy_is_kept_and_a_dead_ones_copy_removed(excerpts: list[Path], tmp_path: Path) -> None:  # noqa: F811
    song = _mp3(excerpts[0], tmp_path / "song.mp3")
    before = song.read_bytes()
    others = [tmp_path / n for n in (".hidden", ".song.mp3.abc.tmp", "song.mp3.tagger-tmp", "notes.tagger-tmp")]
    for p in others:
        p.write_bytes(b"a person's file")
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(song)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        copy = Path(proc.stdout.readline().strip())  # the writer is inside its change now
        assert copy.parent == tmp_path and copy.exists() and tags.is_temporary_copy(copy.name), copy
        swept: list[str] = []
        assert [f.path for f in walk([tmp_path], on_swept=swept.append)] == [str(song)]
        assert swept == [] and copy.exists(), "a copy being written was removed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert copy.exists()  # the litter a killed tagger leaves
        assert [f.path for f in walk([tmp_path])] == [str(song)] and copy.exists()  # no on_swept: nothing changes
        assert [f.path for f in walk([tmp_path], on_swept=swept.append)] == [str(song)]
        assert swept == [str(copy)] and not copy.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert song.read_bytes() == before
    assert all(p.read_bytes() == b"a person's file" for p in others), "something not ours was touched"


def _kill_mid_write(cfg: Path, lib: Path, db: Path) -> bool:
    """Run ``tagger scan`` and ``kill -9`` it while a copy exists; True if one was left."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tagger.cli", "--config", str(cfg), "scan", "--json", str(lib)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if any(e.name.endswith(".tagger-tmp") for e in os.scandir(lib)):
                os.killpg(proc.pid, signal.SIGKILL)  # the scan and its decode processes
                proc.wait()
                return bool(_copies(lib))
            time.sleep(0.001)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_scan_killed_mid_write_leaves_no_copy_after_the_next(tiny_bundle: Path, excerpts: list[Path], tmp_path: Path) -> None:  # noqa: F811
    lib = tmp_path / "music"
    lib.mkdir()
    songs = [_mp3(src, lib / f"{i}-{src.stem}.mp3", art_mb=24) for i in range(2) for src in excerpts]
    audio = {p: helpers.audio_hash(p) for p in songs}
    db = tmp_path / "t.db"
    cfg = _config(tmp_path, tiny_bundle, db)
    left = False
    for _ in range(len(songs)):  # each try gets further: tagged files are skipped after a kill
        if _kill_mid_write(cfg, lib, db):
            left = True
            break
    assert left, "no kill landed in the middle of a write"
    litter = _copies(lib)
    assert litter  # whole or partly copied
    proc = tagger(cfg, "scan", str(lib))
    for p in litter:
        assert f"removed {p}: a temporary copy left by an interrupted tagger" in proc.stderr, proc.stderr
    assert _copies(lib) == [], "the next scan left the copies"
    assert {r["status"] for r in rows(db, "SELECT status FROM tracks")} == {"tagged"}
    writes = rows(db, "SELECT t.path, count(*) AS n FROM tag_writes w JOIN tracks t ON t.id = w.track_id WHERE w.dry_run = 0 GROUP BY t.path")
    assert sorted(r["path"] for r in writes) == sorted(str(p) for p in songs)
    assert {r["n"] for r in writes} == {1}, writes  # every file tagged once
    for p in songs:
        assert tags.read_state(p).ours, p
        assert helpers.audio_hash(p) == audio[p], f"{p}: audio changed"
    assert scan(cfg, str(lib))["counts"].get("unchanged") == len(songs)


def test_only_a_sweeping_walk_removes_a_copy(tmp_path: Path) -> None:
    """A walk without ``on_swept`` (a dry run's) changes nothing, not even our own litter."""
    lib = tmp_path / "music"
    lib.mkdir()
    copy = lib / ".song.mp3.abcd1234.tagger-tmp"
    copy.write_bytes(b"x" * 100)
    assert not tags.remove_stale_copy(lib / "song.mp3")  # not a copy's name
    assert list(walk([lib])) == [] and copy.exists()
    assert tags.remove_stale_copy(copy) and not copy.exists()


if sys.platform != "linux":  # flock semantics as on the systems tagger is made for
    pytestmark = pytest.mark.skip("Linux only")
