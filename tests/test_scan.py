"""``tagger scan`` end to end (issue "tagger scan" §7).

The real command runs in a subprocess (``python -m tagger.cli``) with a config
file written here: the tiny test model, one decode worker, a database in the
test's folder and ``min_confidence = 0`` (the tiny model's probabilities are near
uniform). Files are made from 8-second excerpts of shared GTZAN clips, in every
format, with ordinary tags, cover art and (for half of them) a genre set by a
person. Results are read back with mutagen and ``sqlite3`` directly, never
through tagger.

Each classifying scan costs a TensorFlow start-up (several seconds), so the
main test walks one library through every stage in order: an interrupted scan
and its continuation (keep policy), a no-op re-scan, a dry run, merge, replace,
the query commands, restore. Bad inputs, the locked database and files that
vanish or change mid-scan have tests of their own.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import helpers
import pytest
from mutagen.flac import FLAC

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 8
HAND = "Shoegaze"  # a genre the model cannot output, so merge and replace are visible
SEP = "; "
TAGS = {"title": "Test Title", "artist": "Test Artist", "album": "Test Älbum"}
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "NO_COLOR": "1"}
ENV.pop("TAGGER_CONFIG", None)


# file name: (ffmpeg codec args, tag family, genre set by a person?)
FORMATS: dict[str, tuple[list[str], str, bool]] = {
    "mp3-v23.mp3": (["-c:a", "libmp3lame", "-b:a", "64k", "-id3v2_version", "3"], "id3", True),
    "mp3-v24.mp3": (["-c:a", "libmp3lame", "-b:a", "64k", "-id3v2_version", "4"], "id3", False),
    "flac.flac": (["-c:a", "flac"], "flac", True),
    "ogg.ogg": (["-c:a", "libvorbis", "-q:a", "0"], "ogg", False),
    "opus.opus": (["-c:a", "libopus", "-b:a", "32k"], "ogg", True),
    "m4a-aac.m4a": (["-c:a", "aac", "-b:a", "64k"], "mp4", False),
    "m4a-alac.m4a": (["-c:a", "alac"], "mp4", True),
    "aiff.aiff": (["-write_id3v2", "1", "-id3v2_version", "4"], "id3", False),
    "wav.wav": (["-c:a", "pcm_s16le"], "id3", True),  # ID3 chunk (v2.3) added with mutagen
    "wma.wma": (["-c:a", "wmav2", "-b:a", "64k"], "asf", False),
}


# --- making files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def excerpts(
    shared_audio: Path, ffmpeg: str, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """8-second untagged WAV excerpts of three shared clips of different genres."""
    out = tmp_path_factory.mktemp("excerpts")
    clips = [shared_audio / g / f"{g}.00001.flac" for g in ("rock", "classical", "jazz")]
    paths = []
    for clip in clips:
        path = out / f"{clip.stem}.wav"
        helpers.run_ffmpeg(
            "-t", str(SECONDS), "-i", str(clip), "-map_metadata", "-1", "-c:a", "pcm_s16le", str(path)
        )  # fmt: skip
        paths.append(path)
    return paths


def _make_library(folder: Path, excerpts: list[Path]) -> dict[Path, tuple[str, bool]]:
    """Every format, tagged and with cover art; ``{path: (family, has a hand-set genre)}``."""
    folder.mkdir()
    files = {}
    for i, (name, (codec, family, hand)) in enumerate(FORMATS.items()):
        path = folder / name
        meta: list[str] = []
        if family != "id3" or path.suffix != ".wav":
            meta = [
                a
                for k, v in {**TAGS, **({"genre": HAND} if hand else {})}.items()
                for a in ("-metadata", f"{k}={v}")
            ]
        helpers.run_ffmpeg("-i", str(excerpts[i % len(excerpts)]), *codec, *meta, str(path))
        helpers.add_art(path, family, TAGS, hand_genre=HAND if hand else None)
        files[path] = (family, hand)
    return files


# --- reading files back with mutagen -------------------------------------------------


def _read(path: Path, family: str) -> dict[str, Any]:
    """The file's tags as mutagen sees them, with our marker's genres parsed."""
    tags = helpers.read_tags(path, family)
    return {**tags, "marker": json.loads(tags["marker"])["added"] if tags["marker"] else None}


def _on_disk(genres: list[str], before: dict[str, Any]) -> list[str]:
    """How ``genres`` are stored: ID3v2.3 holds one value joined with the separator."""
    if before["version"] is not None and before["version"][:2] == (2, 3):
        return [SEP.join(genres)] if genres else []
    return list(genres)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- running tagger, reading its database ---------------------------------------------


def _config(folder: Path, bundle: Path, db: Path, *, busy_timeout: float = 10.0) -> Path:
    cfg = folder / "config.toml"
    cfg.write_text(
        f'[model]\npath = "{bundle}"\nworkers = 1\nbatch_size = 1\nmax_windows = 1\n\n'
        f'[database]\npath = "{db}"\nbusy_timeout = {busy_timeout}\n\n'
        "[tags]\nmin_confidence = 0.0\n"
    )
    return cfg


def _noise(line: str) -> bool:
    """TensorFlow's start-up chatter, which no setting silences."""
    return (
        line.startswith(("I0000", "W0000", "WARNING: All log messages"))
        or "oneDNN" in line
        or "cpu_feature_guard" in line
    )


def _stderr(err: str) -> str:
    return "\n".join(line for line in err.splitlines() if not _noise(line))


def tagger(
    cfg: Path, *args: str, prefix: tuple[str, ...] = (), expect: int | None = 0
) -> subprocess.CompletedProcess:
    """Run the real command; ``stderr`` comes back without TensorFlow's chatter."""
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "tagger.cli", "--config", str(cfg), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    proc.stderr = _stderr(proc.stderr)
    if expect is not None:
        assert proc.returncode == expect, (
            f"tagger {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def scan(cfg: Path, *args: str, expect: int = 0) -> dict[str, Any]:
    """``tagger scan --json ARGS``: its summary, after checking the exit status."""
    proc = tagger(cfg, "scan", "--json", *args, expect=expect)
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


rows = helpers.rows


def statuses(db: Path) -> dict[str, str]:
    return {r["path"]: r["status"] for r in rows(db, "SELECT path, status FROM tracks")}


def chosen(db: Path) -> dict[str, list[str]]:
    """The genres the model chose for each track (written names), from ``predictions``."""
    sql = "SELECT t.path, p.genres FROM tracks t JOIN predictions p ON p.track_id = t.id"
    return {r["path"]: json.loads(r["genres"]) for r in rows(db, sql)}


def real_writes(db: Path, path: Path) -> list[dict[str, Any]]:
    sql = "SELECT w.* FROM tag_writes w JOIN tracks t ON t.id = w.track_id WHERE t.path = ? ORDER BY w.id"
    return rows(db, sql, str(path))


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_once_recorded(proc: subprocess.Popen, db: Path) -> tuple[str, str]:
    """Ctrl-C ``proc`` (its whole process group) once a track is recorded as done.

    Tiny files classify in a fraction of a second each, so the scan could finish
    before a signal lands. The moment a first track is done the test takes the
    database's write lock, which parks the scan at its next write (it waits, as
    for any other writer); the signal goes in while it waits, and the lock is let
    go so that the scan can see it. It stops within a file or two.
    """
    holder = None
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"the scan ended before it was interrupted: {proc.stderr.read()}"
                )
            assert time.monotonic() < deadline, "no track was recorded in time"
            try:
                if holder is None:
                    holder = sqlite3.connect(
                        f"file:{db}?mode=rw", uri=True, timeout=30, isolation_level=None
                    )
                sql = "SELECT count(*) FROM tracks WHERE status != 'pending'"
                if holder.execute(sql).fetchone()[0]:
                    holder.execute("BEGIN IMMEDIATE")
                    break
            except sqlite3.OperationalError:  # no database or no schema yet
                pass
            time.sleep(0.01)
        if proc.poll() is not None:
            raise AssertionError(f"the scan ended before it was interrupted: {proc.stderr.read()}")
        time.sleep(0.5)  # the scan reaches its next write and waits there
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
        holder.execute("COMMIT")
        return proc.communicate(timeout=120)
    finally:
        if holder is not None:
            holder.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- the library, stage by stage ------------------------------------------------------


def test_scan_end_to_end(tiny_bundle: Path, excerpts: list[Path], tmp_path: Path) -> None:
    """One library, every format: Ctrl-C, keep, dry run, merge, replace, queries, restore."""
    lib = tmp_path / "music"
    files = _make_library(lib, excerpts)
    db = tmp_path / "t.db"
    cfg = _config(tmp_path, tiny_bundle, db)
    hand = sorted(p for p, (_, h) in files.items() if h)
    bare = sorted(p for p, (_, h) in files.items() if not h)
    original = {p: _read(p, fam) for p, (fam, _) in files.items()}
    sha0 = {p: _sha(p) for p in files}
    audio0 = {p: helpers.audio_hash(p) for p in files}
    for p, (_, h) in files.items():
        assert original[p]["pictures"] == 1 and len(original[p]["others"]) >= 4, p
        assert original[p]["genres"] == ([HAND] if h else []) and original[p]["marker"] is None, p
    assert {original[p]["version"] for p in files if p.suffix in helpers.ID3_CLASSES} == {
        (2, 3, 0),
        (2, 4, 0),
    }

    def check(path: Path, genres: list[str], ours: bool, added: list[str] | None = None) -> None:
        """The file holds ``genres``, our marker naming ``added`` (default: all of them) or
        none; nothing else changed."""
        family, _ = files[path]
        now = _read(path, family)
        assert now["genres"] == _on_disk(genres, original[path]), path
        assert now["marker"] == ((genres if added is None else added) if ours else None), path
        assert now["others"] == original[path]["others"], f"{path}: other tags or cover art changed"
        assert now["version"] == original[path]["version"], path

    # 1. Ctrl-C in the middle of the first scan (keep policy).
    proc = subprocess.Popen(
        [sys.executable, "-m", "tagger.cli", "--config", str(cfg), "scan", "--json", str(lib)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which a terminal's Ctrl-C signals as a whole
        # Ctrl-C as from a terminal, also where the tests run with it ignored (a shell's
        # background job, `bash .ci/run &`): the scan would inherit that and never see it.
        preexec_fn=_sigint_default,
    )
    out, err = _interrupt_once_recorded(proc, db)
    err = _stderr(err)
    assert proc.returncode == 130, f"{proc.returncode}\n{out}\n{err}"
    assert "Traceback" not in err, err  # neither the scan nor its decode workers
    summary = json.loads(out)
    assert summary["interrupted"] is True
    status = statuses(db)
    finished = {Path(p) for p, s in status.items() if s in ("tagged", "kept")}
    assert 1 <= len(finished) < len(files), status
    picked = chosen(db)
    for p in files:
        if p in finished:  # done, and recorded as done
            check(p, [HAND] if p in hand else picked[str(p)], ours=p in bare)
        else:  # not recorded as done: not touched at all
            assert _sha(p) == sha0[p], f"{p} changed but is not recorded as done"
    assert not list(lib.rglob("*tagger-tmp*")), "a temporary copy was left behind"
    assert {o["path"] for o in summary["files"] if o["action"] in ("tagged", "kept")} == {
        str(p) for p in finished
    }

    # 2. The next scan does only what is left.
    summary = scan(cfg, str(lib))
    assert {Path(o["path"]) for o in summary["files"]} == set(files) - finished
    assert summary["counts"]["unchanged"] == len(finished)
    picked = chosen(db)
    assert set(picked) == {str(p) for p in files}
    for p in bare:
        check(p, picked[str(p)], ours=True)
        assert picked[str(p)] and len(picked[str(p)]) == 1
        writes = real_writes(db, p)
        assert [
            (
                w["policy"],
                json.loads(w["genres_before"]),
                json.loads(w["genres_after"]),
                w["dry_run"],
            )
            for w in writes
        ] == [("keep", [], picked[str(p)], 0)]
    for p in hand:
        check(p, [HAND], ours=False)
        assert real_writes(db, p) == []
    assert statuses(db) == {**{str(p): "tagged" for p in bare}, **{str(p): "kept" for p in hand}}
    assert all(helpers.audio_hash(p) == audio0[p] for p in files), "decoded audio changed"

    # The query commands read what scan wrote.
    q = json.loads(tagger(cfg, "query", "--format", "json").stdout)
    assert [r["path"] for r in q] == sorted(str(p) for p in files)
    preds = {
        r["path"]: r
        for r in rows(
            db,
            "SELECT t.path, p.top_genre, p.confidence FROM tracks t JOIN predictions p ON p.track_id = t.id",
        )
    }
    for r in q:
        assert r["status"] == ("kept" if Path(r["path"]) in hand else "tagged")
        assert r["written_genres"] == ([] if Path(r["path"]) in hand else picked[r["path"]])
        assert r["top_genre"] == preds[r["path"]]["top_genre"]
        assert r["confidence"] == pytest.approx(preds[r["path"]]["confidence"])
        assert r["model_name"] == "tiny-test"
    kept = json.loads(tagger(cfg, "query", "--status", "kept", "--format", "json").stdout)
    assert [r["path"] for r in kept] == [str(p) for p in hand]
    label = preds[str(bare[0])]["top_genre"]
    with_label = sorted(p for p, r in preds.items() if r["top_genre"] == label)
    written = picked[str(bare[0])][0].upper()  # the written name, in any case
    got = json.loads(tagger(cfg, "query", "--genre", written, "--format", "json").stdout)
    assert [r["path"] for r in got] == with_label
    args = ("--path", "*.m4a", "--limit", "1", "--format", "json")
    assert [r["path"] for r in json.loads(tagger(cfg, "query", *args).stdout)] == [
        str(lib / "m4a-aac.m4a")
    ]
    table = list(csv.DictReader(io.StringIO(tagger(cfg, "query", "--format", "csv").stdout)))
    assert [r["path"] for r in table] == [r["path"] for r in q]
    assert list(table[0]) == [
        "path",
        "status",
        "top_genre",
        "confidence",
        "written_genres",
        "model_name",
        "last_scanned",
    ]
    assert {r["path"]: r["written_genres"] for r in table} == {
        r["path"]: SEP.join(r["written_genres"]) for r in q
    }
    text = tagger(cfg, "query").stdout
    assert text.rstrip().endswith(f"({len(files)} tracks)") and all(str(p) in text for p in files)

    # 3. Nothing changed: a re-scan opens no file.
    summary = scan(cfg, str(lib))
    assert summary["files"] == [] and summary["counts"]["unchanged"] == len(files)

    # 4. Dry run of merge: says what it would do, writes no file; a real scan then does it.
    sha = {p: _sha(p) for p in files}
    status = statuses(db)
    proc = tagger(cfg, "scan", "--dry-run", "--force", "--policy", "merge", str(lib))
    would = [line for line in proc.stdout.splitlines() if line.startswith("would tag ")]
    assert sorted(line.split(": ")[0].removeprefix("would tag ") for line in would) == [
        str(p) for p in hand
    ]
    assert all(f": {HAND} -> {HAND}; " in line for line in would), would
    assert f"{len(hand)} would-tag, {len(bare)} unchanged" in proc.stdout.splitlines()[-1]
    assert {p: _sha(p) for p in files} == sha, "a dry run changed a file"
    assert statuses(db) == status, "a dry run must leave each track's status as it truly is"
    dry = rows(db, "SELECT genres_after FROM tag_writes WHERE dry_run = 1")
    assert len(dry) == len(hand)
    summary = scan(cfg, "--policy", "merge", str(lib))  # no --force: the dry run left them to do
    assert sorted(o["path"] for o in summary["files"]) == [str(p) for p in hand]
    assert summary["counts"]["tagged"] == len(hand) and summary["counts"]["unchanged"] == len(bare)
    for p in hand:  # the marker names only what tagger added, not the person's genre
        check(p, [HAND, *picked[str(p)]], ours=True, added=picked[str(p)])

    # 5. Replace: our genre only.
    summary = scan(cfg, "--force", "--policy", "replace", *map(str, hand))
    assert summary["counts"]["tagged"] == len(hand) and len(summary["files"]) == len(hand)
    for p in files:
        check(p, picked[str(p)], ours=True)
    writes = real_writes(db, hand[0])
    assert [(w["policy"], w["dry_run"]) for w in writes] == [
        ("merge", 1),
        ("merge", 0),
        ("replace", 0),
    ]
    assert json.loads(writes[-1]["genres_before"]) == [HAND, *picked[str(hand[0])]]

    # show, stats, db current.
    info = json.loads(tagger(cfg, "show", "--json", str(hand[0])).stdout)
    assert info["status"] == "tagged" and info["format"] == hand[0].suffix.lstrip(".")
    assert len(info["predictions"]) == 1
    probs = info["predictions"][0]["probabilities"]
    assert sorted(probs) == ["blues", "classical", "jazz", "rock"] and sum(
        probs.values()
    ) == pytest.approx(1, abs=1e-3)
    assert [(w["policy"], w["dry_run"], w["after"]) for w in info["tag_writes"]] == [
        ("merge", True, [HAND, *picked[str(hand[0])]]),
        ("merge", False, [HAND, *picked[str(hand[0])]]),
        ("replace", False, picked[str(hand[0])]),
    ]
    text = tagger(cfg, "show", str(hand[0])).stdout
    assert "tag history:" in text and "(dry run)" in text and "status tagged" in text
    assert (
        "not in the database" in tagger(cfg, "show", str(tmp_path / "nope.flac"), expect=1).stderr
    )
    png = tmp_path / "stats.png"
    st = json.loads(tagger(cfg, "stats", "--json", "--plot", str(png)).stdout)
    assert st["total"] == len(files) and st["by_status"] == {"tagged": len(files)}
    assert st["by_genre"] == {
        g: sum(1 for r in preds.values() if r["top_genre"] == g) for g in st["by_genre"]
    }
    assert sum(st["by_genre"].values()) == len(files)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    current = tagger(cfg, "db", "current").stdout
    assert (
        str(db) in current and "revision 0003 (head 0003)" in current and "upgrade" not in current
    )
    assert tagger(cfg, "db", "path").stdout.strip() == str(db)

    # 6. Restore: every file gets back what the person had; a re-scan (under other settings
    # than the last tagging's, even) leaves that alone, and nothing shows as written.
    proc = tagger(cfg, "restore", "--all")
    lines = proc.stdout.splitlines()
    assert len(lines) == len(files) and all(line.startswith("restored") for line in lines), (
        proc.stdout
    )
    for p in files:
        check(p, [HAND] if p in hand else [], ours=False)
        assert helpers.audio_hash(p) == audio0[p], f"{p}: decoded audio changed"
    open_writes = rows(
        db, "SELECT id FROM tag_writes WHERE dry_run = 0 AND restored = 0 AND policy != 'restore'"
    )
    assert open_writes == []
    q = json.loads(tagger(cfg, "query", "--format", "json").stdout)
    assert {r["path"]: r["written_genres"] for r in q} == {str(p): [] for p in files}
    assert set(statuses(db).values()) == {"classified"}
    assert tagger(cfg, "restore", "--all").stdout.strip() == "nothing to restore"
    summary = scan(cfg, str(lib))
    assert summary["files"] == [] and summary["counts"]["unchanged"] == len(files)

    # 7. A file deleted between scans becomes "missing".
    bare[0].unlink()
    summary = scan(cfg, str(lib))
    assert summary["files"] == []
    missing = json.loads(tagger(cfg, "query", "--status", "missing", "--format", "json").stdout)
    assert [r["path"] for r in missing] == [str(bare[0])]


# --- bad inputs ------------------------------------------------------------------------


def _without_root_override() -> tuple[str, ...]:
    """A command prefix under which permission bits bind (root ignores them otherwise).

    Root keeps its uid (the interpreter lives under /root) but loses the
    capabilities that bypass file permissions, in the child only.
    """
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to bind")
    caps = "-dac_override,-dac_read_search"
    return (setpriv, "--bounding-set", caps, "--inh-caps", caps)


def test_bad_inputs(tiny_bundle: Path, excerpts: list[Path], tmp_path: Path) -> None:
    """Each bad input of §5 is recorded with a one-line reason; the rest is done; exit 1."""
    lib = tmp_path / "music"
    lib.mkdir()
    good = helpers.make_audio(excerpts[2], "flac", lib, name="good.flac")
    m4a = helpers.make_audio(excerpts[2], "m4a", tmp_path, name="whole.m4a")
    (lib / "corrupt.mp3").write_bytes(b"this is not audio\n" * 500)
    (lib / "empty.flac").write_bytes(b"")
    (lib / "picture.ogg").write_bytes(helpers.PNG)  # not audio, whatever the extension says
    (lib / "notes.txt").write_text("not music; never looked at\n")
    data = good.read_bytes()
    (lib / "truncated.flac").write_bytes(data[: len(data) // 2])
    (lib / "truncated.m4a").write_bytes(m4a.read_bytes()[: m4a.stat().st_size // 2])
    unreadable = lib / "unreadable.flac"
    readonly = lib / "readonly.flac"
    shutil.copyfile(good, unreadable)
    shutil.copyfile(good, readonly)
    sealed = lib / "sealed"
    sealed.mkdir()
    shutil.copyfile(good, sealed / "inside.flac")
    unreadable.chmod(0o000)
    readonly.chmod(0o444)
    sealed.chmod(0o000)
    ro_sha = _sha(readonly)
    prefix = _without_root_override()
    try:
        probe = subprocess.run([*prefix, "cat", str(unreadable)], capture_output=True)
        if probe.returncode == 0:
            pytest.skip("this environment lets us read a 0o000 file")
        db = tmp_path / "t.db"
        cfg = _config(tmp_path, tiny_bundle, db)
        proc = tagger(cfg, "scan", "--json", str(lib), prefix=prefix, expect=1)
    finally:
        sealed.chmod(0o755)
        unreadable.chmod(0o644)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"tagger: skipped {sealed}: Permission denied" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["skipped_paths"] == [{"path": str(sealed), "reason": "Permission denied"}]
    actions = {Path(o["path"]).name: o["action"] for o in summary["files"]}
    failed = [
        "corrupt.mp3",
        "empty.flac",
        "picture.ogg",
        "truncated.flac",
        "truncated.m4a",
        "unreadable.flac",
    ]
    assert actions == {
        "good.flac": "tagged",
        "readonly.flac": "failed",
        **dict.fromkeys(failed, "failed"),
    }
    assert summary["counts"]["tagged"] == 1 and summary["counts"]["failed"] == len(failed) + 1

    tracks = {
        Path(r["path"]).name: r for r in rows(db, "SELECT path, status, last_error FROM tracks")
    }
    assert set(tracks) == set(actions), "notes.txt or the sealed folder reached the database"
    for name in failed:
        assert tracks[name]["status"] == "failed", name
        error = tracks[name]["last_error"]
        assert error and "\n" not in error and "Traceback" not in error, (name, error)
    assert "permission denied" in tracks["unreadable.flac"]["last_error"].lower()
    assert "empty" in tracks["empty.flac"]["last_error"]
    assert "too short" in tracks["truncated.flac"]["last_error"]
    # Tag write refused: classified, not tagged, with the reason; the file is as it was.
    assert tracks["readonly.flac"]["status"] == "classified"
    assert "tag write failed" in tracks["readonly.flac"]["last_error"]
    assert "permission denied" in tracks["readonly.flac"]["last_error"]
    assert _sha(readonly) == ro_sha
    # Its write-ahead record went with the refused write: nothing for restore to undo.
    assert real_writes(db, readonly) == []
    assert len(real_writes(db, good)) == 1
    assert (
        rows(
            db,
            "SELECT count(*) AS n FROM predictions p JOIN tracks t ON t.id = p.track_id WHERE t.path = ?",
            str(readonly),
        )[0]["n"]
        == 1
    )
    assert tracks["good.flac"]["status"] == "tagged" and FLAC(good).get("tagger_genre")
    assert not list(lib.rglob("*tagger-tmp*"))
    failures = {Path(f["path"]).name: f["reason"] for f in summary["failures"]}
    assert set(failures) == {*failed, "readonly.flac"}


def test_locked_database(tiny_bundle: Path, excerpts: list[Path], tmp_path: Path) -> None:
    """Another process holds the write lock: wait busy_timeout, then exit 3 with one line."""
    from tagger.store.db import open_db

    lib = tmp_path / "music"
    lib.mkdir()
    track = helpers.make_audio(excerpts[0], "flac", lib, name="track.flac")
    sha = _sha(track)
    db = tmp_path / "t.db"
    open_db(db).dispose()  # an existing (WAL) database, as another tagger left it
    cfg = _config(tmp_path, tiny_bundle, db, busy_timeout=1.0)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        t0 = time.monotonic()
        proc = tagger(cfg, "scan", str(lib), expect=3)
        waited = time.monotonic() - t0
    finally:
        holder.close()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "locked" in lines[0] and lines[0].startswith("tagger: "), proc.stderr
    assert "busy timeout" in lines[0]
    assert waited >= 1.0
    assert _sha(track) == sha
    assert rows(db, "SELECT count(*) AS n FROM tracks")[0]["n"] == 0


def test_usage_errors(tiny_bundle: Path, tmp_path: Path) -> None:
    """Exit 2, one line, no database created."""
    cfg = _config(tmp_path, tiny_bundle, tmp_path / "t.db")
    assert (
        "nothing to scan" in tagger(cfg, "scan", str(tmp_path / "no-such-folder"), expect=2).stderr
    )
    assert (
        "Invalid value"
        in tagger(cfg, "scan", "--policy", "overwrite", str(tmp_path), expect=2).stderr
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[tags]\npolicy = "keep"\ncolour = "blue"\n')
    proc = tagger(bad, "scan", str(tmp_path), expect=2)
    assert proc.stderr.strip() == "tagger: configuration: unknown setting tags.colour"
    assert not (tmp_path / "t.db").exists()


# --- files that vanish or change while the scan runs --------------------------------------


class _Bundle:
    sha256 = "0" * 64
    name = "stub"
    labels = ["blues", "rock"]
    meta: dict[str, Any] = {}


class _Classifier:
    bundle = _Bundle()


def test_file_vanishes_or_changes_during_scan(excerpts: list[Path], tmp_path: Path) -> None:
    """Library.apply gets a result for a file that is gone, or not the file that was decoded."""
    from tagger.library import FileStat, Library, Options
    from tagger.model.infer import Classification
    from tagger.store.db import open_db

    db = open_db(tmp_path / "t.db")
    lib = Library(db, _Classifier(), Options(min_confidence=0.0))  # type: ignore[arg-type]

    def seen(path: Path) -> FileStat:
        st = path.stat()
        return FileStat(str(path), st.st_size, st.st_mtime)

    def result(path: Path) -> Classification:
        return Classification(str(path), {"blues": 0.3, "rock": 0.7}, windows=1, duration=8.0)

    def track(path: Path) -> dict[str, Any]:
        return rows(
            tmp_path / "t.db",
            "SELECT status, last_error, size, mtime FROM tracks WHERE path = ?",
            str(path),
        )[0]

    try:
        gone = helpers.make_audio(excerpts[0], "flac", tmp_path, name="gone.flac")
        before = seen(gone)
        gone.unlink()
        out = lib.apply(result(gone), before)
        assert (out.action, out.reason) == ("failed", "file vanished during the scan")
        assert (
            track(gone)["status"] == "failed"
            and track(gone)["last_error"] == "file vanished during the scan"
        )

        moved = helpers.make_audio(excerpts[0], "flac", tmp_path, name="changed.flac")
        before = seen(moved)
        with moved.open("ab") as f:  # a tag editor (or a download) got there first
            f.write(b"\0" * 10)
        content = moved.read_bytes()
        out = lib.apply(result(moved), before)
        assert out.action == "changed" and "classified again" in out.reason
        assert moved.read_bytes() == content, "a file that changed under the scan was written to"
        assert (
            track(moved)["status"] == "pending"
            and "changed during the scan" in track(moved)["last_error"]
        )
        todo, unchanged = lib.changed([seen(moved)], lib.known())
        assert [f.path for f in todo] == [str(moved)] and unchanged == 0

        # The same file, unchanged since it was looked at: classified and tagged.
        out = lib.apply(result(moved), seen(moved))
        assert out.action == "tagged" and out.genres == ("Rock",)
        assert FLAC(moved)["genre"] == ["Rock"]
        assert track(moved)["status"] == "tagged" and track(moved)["last_error"] is None
        assert lib.changed([seen(moved)], lib.known()) == ([], 1)

        # Replaced by a broken file: failed, recorded with the size that failed, so the
        # next scan leaves it alone until it changes again.
        moved.write_bytes(b"not audio" * 100)
        broken = Classification(str(moved), error="cannot decode: invalid data")
        out = lib.apply(broken, seen(moved))
        assert (out.action, out.reason) == ("failed", "cannot decode: invalid data")
        assert track(moved)["status"] == "failed" and track(moved)["size"] == 900
        assert track(moved)["last_error"] == "cannot decode: invalid data"
        assert lib.changed([seen(moved)], lib.known()) == ([], 1)

        # Not the file's failure but the reader's (a cluster node without the path): reported
        # as failed, recorded pending with the reason, and taken again by the next scan.
        unseen = helpers.make_audio(excerpts[0], "flac", tmp_path, name="unseen.flac")
        error = "no such file on node n2 (every node must see the library at the same path)"
        out = lib.apply(Classification(str(unseen), error=error, retry=True), seen(unseen))
        assert (out.action, out.reason) == ("failed", error)
        assert track(unseen)["status"] == "pending" and track(unseen)["last_error"] == error
        todo, unchanged = lib.changed([seen(unseen)], lib.known())
        assert [f.path for f in todo] == [str(unseen)] and unchanged == 0
    finally:
        db.dispose()


def test_a_file_named_beside_its_folder_is_walked_once(tmp_path: Path) -> None:
    """``scan ~/Music ~/Music/a.mp3``, either way round, or a file named twice: one entry each."""
    from tagger.library import walk

    (tmp_path / "lib" / "sub").mkdir(parents=True)
    a = tmp_path / "lib" / "a.mp3"
    b = tmp_path / "lib" / "sub" / "b.flac"
    for f in (a, b):
        f.write_bytes(b"\0" * 100)
    lib = tmp_path / "lib"
    for roots in ([lib, a], [a, lib], [b, lib, b], [a, a]):
        paths = [f.path for f in walk(roots)]
        assert len(paths) == len(set(paths)), (roots, paths)
        assert set(paths) == ({str(a)} if roots == [a, a] else {str(a), str(b)})
