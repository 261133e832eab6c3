"""What tagger does to a person's files across scans (issue "Trust" §2, §3, §6, §7).

The real command on real files, as in ``test_scan.py`` (whose runners this module
shares): a library whose genres were set the many ways other programs store them
(numeric ID3 references, padded values, ID3v1 only, no tag at all, numeric MP4
``gnre``, lower-case Vorbis keys, no FLAC comment block), then scans under
different policies and settings, and a restore.

* §2: a ``keep`` scan after a ``merge`` keeps the person's genres next to ours.
* §3: after scan and restore every tag frame or field is identical to before,
  the audio too.
* §6: audio with the wrong extension is tagged as what it is; failures are
  reported once per file, with their whole reason.
* §7: new tag settings on an unchanged library are applied from the stored
  predictions (nothing classified again); a dry run leaves statuses true; the
  summary says why ``--top-k 2`` wrote one genre; a restore is not "written".
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import helpers
import mutagen.id3
import pytest
from mutagen.asf import ASF
from mutagen.flac import FLAC
from mutagen.id3 import ID3, TCON, TIT2, TPE1
from mutagen.mp3 import MP3
from mutagen.mp4 import MP4, Atom
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis
from test_scan import (  # the runners of the scan tests, and their excerpts
    _config,
    _without_root_override,
    excerpts,  # noqa: F401  (a fixture)
    rows,
    scan,
    statuses,
    tagger,
)

from tagger.library import FileStat, Library, Options
from tagger.store import repo
from tagger.store.db import open_db
from tagger.tags import Marker, read_state, write_genres

PERSON = ["Post-Rock", "Ambient"]  # genres the test model cannot output


def _mp3(src: Path, out: Path, version: int) -> Path:
    helpers.run_ffmpeg("-i", src, "-map_metadata", "-1", "-c:a", "libmp3lame", "-b:a", "64k", "-id3v2_version", str(version), out)
    return out


def _originals(folder: Path, clips: list[Path]) -> list[Path]:
    """Files whose genre (or lack of one) is stored the ways other programs store it."""
    folder.mkdir()
    src = clips[0]
    made = []

    # ID3v2.3 with a numeric ID3v1 reference "(9)" (Metal), and an ID3v1 tag.
    p = _mp3(src, folder / "v23-numeric.mp3", 3)
    tags = ID3()
    tags.add(TIT2(encoding=1, text=["Numeric"]))
    tags.add(TCON(encoding=0, text=["(9)"]))
    tags.save(p, v1=2, v2_version=3)
    made.append(p)
    # ID3v2.4 with padded values.
    p = _mp3(src, folder / "v24-padded.mp3", 4)
    tags = ID3(p)
    tags.add(TCON(encoding=3, text=["  ambient  ", "Post-Rock"]))
    tags.save(p, v2_version=4)
    made.append(p)
    # No tag at all, and an ID3v1 tag only (genre Metal, index 9).
    made.append(_mp3(src, folder / "untagged.mp3", 0))
    p = _mp3(src, folder / "v1-only.mp3", 0)
    tags = ID3()
    tags.add(TIT2(encoding=0, text=["Old"]))
    tags.add(TPE1(encoding=0, text=["Someone"]))
    tags.add(TCON(encoding=0, text=["Metal"]))
    tags.save(p, v1=2, v2_version=4)
    mutagen.id3.delete(p, delete_v1=False, delete_v2=True)
    assert p.read_bytes()[:3] != b"ID3" and p.read_bytes()[-128:-125] == b"TAG"
    made.append(p)
    # FLAC: a lower-case, padded "genre" first among the comments; FLAC with no comment block.
    p = helpers.make_audio(src, "flac", folder, name="person.flac", extra=("-metadata", "title=T"))
    f = FLAC(p)
    f.tags.insert(0, ("genre", "  post-rock  "))
    f.tags.append(("GENRE", PERSON[1]))
    f.save()
    made.append(p)
    p = helpers.make_audio(src, "flac", folder, name="no-comments.flac")
    FLAC(p).delete()
    assert FLAC(p).tags is None
    made.append(p)
    # Ogg Vorbis and Opus with several genres.
    for fmt, cls in (("ogg", OggVorbis), ("opus", OggOpus)):
        p = helpers.make_audio(src, fmt, folder, name=f"person.{fmt}")
        f = cls(p)
        f["GENRE"] = PERSON
        f.save()
        made.append(p)
    # MP4 with the old numeric gnre atom (10 = Metal), and one with no genre.
    p = helpers.make_audio(src, "m4a", folder, name="gnre.m4a")
    f = MP4(p)
    # mutagen reads gnre but never writes it; an atom it cannot parse it writes back as is.
    f.tags._failed_atoms["gnre"] = [Atom.render(b"data", struct.pack(">2IH", 0, 0, 10))]
    f.save()
    assert b"gnre" in p.read_bytes()
    made.append(p)
    made.append(helpers.make_audio(src, "alac", folder, name="untagged.m4a"))
    # WMA with a genre; AIFF and WAV without an ID3 chunk.
    p = helpers.make_audio(src, "wma", folder, name="person.wma")
    f = ASF(p)
    f.tags["WM/Genre"] = PERSON
    f.save()
    made.append(p)
    made.append(helpers.make_audio(src, "aiff", folder, name="untagged.aiff"))
    made.append(helpers.make_audio(src, "wav", folder, name="untagged.wav"))
    return made


def _predictions(db: Path) -> dict[str, dict[str, Any]]:
    sql = "SELECT t.path, p.probabilities, p.created_at FROM predictions p JOIN tracks t ON t.id = p.track_id"
    return {r["path"]: {"p": json.loads(r["probabilities"]), "at": r["created_at"]} for r in rows(db, sql)}


def test_policies_restore_and_new_settings(tiny_bundle: Path, excerpts: list[Path], tmp_path: Path) -> None:  # noqa: F811
    lib = tmp_path / "music"
    files = _originals(lib, excerpts)
    db = tmp_path / "t.db"
    cfg = _config(tmp_path, tiny_bundle, db)
    exact = {p: helpers.exact_tags(p) for p in files}
    audio = {p: helpers.audio_hash(p) for p in files}
    person = {p: read_state(p).genres for p in files}
    assert person[lib / "v23-numeric.mp3"] == ("Metal",) and person[lib / "v1-only.mp3"] == ("Metal",)
    assert person[lib / "gnre.m4a"] == ("Metal",) and person[lib / "person.flac"] == ("post-rock", "Ambient")
    hand = sorted(p for p in files if person[p])
    bare = sorted(p for p in files if not person[p])
    assert len(hand) == 8 and len(bare) == 5

    # 1. First scan, keep: files without a genre are tagged, the others kept.
    summary = scan(cfg, str(lib))
    assert summary["counts"]["tagged"] == len(bare) and summary["counts"]["kept"] == len(hand), summary
    classified = _predictions(db)

    # 2. A dry run of merge on the unchanged library says what it would do (§7: no
    # "unchanged" no-op), touches no file and leaves every status as it is.
    sha = {p: p.read_bytes() for p in files}
    before = statuses(db)
    summary = scan(cfg, "--dry-run", "--policy", "merge", str(lib))
    assert sorted(o["path"] for o in summary["files"] if o["action"] == "would-tag") == [str(p) for p in hand]
    assert all(p.read_bytes() == sha[p] for p in files), "a dry run changed a file"
    assert statuses(db) == before, "a dry run must leave each track's status as it truly is"
    q = json.loads(tagger(cfg, "query", "--format", "json").stdout)
    assert {r["status"] for r in q} == {"tagged", "kept"}

    # 3. merge, for real: the settings are applied from the stored predictions; nothing is
    # classified again.
    summary = scan(cfg, "--policy", "merge", str(lib))
    assert summary["counts"]["tagged"] == len(hand) and summary["counts"]["unchanged"] == len(bare), summary
    assert _predictions(db) == classified, "merge on an unchanged library classified files again"
    merged = {p: read_state(p) for p in files}
    for p in hand:
        ours = merged[p].added
        assert ours and merged[p].genres == (*person[p], *ours), p
        assert merged[p].marker is not None and merged[p].marker.added == ours, "the marker names only ours"

    # 4. §2: the default scan again, classifying everything anew (keep): the person's
    # genres stay next to ours.
    summary = scan(cfg, "--force", str(lib))
    assert summary["counts"]["failed"] == 0
    for p in files:
        assert read_state(p).genres == merged[p].genres, f"{p}: keep after merge changed the genres"

    # 5. §7: top-k 2 on the unchanged library, at a floor only some second genres reach:
    # applied without classifying, and the summary says why files got one genre.
    probs = _predictions(db)
    floor = max(max(v["p"].values()) for v in probs.values())  # one file's top genre at least
    ranked = {p: sorted(v["p"].values(), reverse=True) for p, v in probs.items()}
    short = sum(1 for r in ranked.values() if r[0] >= floor > r[1])
    assert short >= 1
    proc = tagger(cfg, "scan", "--top-k", "2", "--min-confidence", repr(floor), str(lib))
    assert f"  second genre below min_confidence {floor:.2f} on {short} file" in proc.stdout, proc.stdout
    assert {p: v["at"] for p, v in _predictions(db).items()} == {p: v["at"] for p, v in probs.items()}
    summary = scan(cfg, "--top-k", "2", str(lib))  # min_confidence 0: two genres everywhere
    assert summary["notes"] == []
    for p in files:
        state = read_state(p)
        assert len(state.added) == 2 and state.theirs == person[p], p

    # 6. §3: restore gives back every frame and field exactly, and removes the tag blocks
    # tagger created; nothing shows as written any more.
    proc = tagger(cfg, "restore", "--all")
    assert sorted(line.split()[1] for line in proc.stdout.splitlines()) == sorted(str(p) for p in files), proc.stdout
    assert all(line.startswith("restored ") for line in proc.stdout.splitlines()), proc.stdout
    for p in files:
        assert helpers.exact_tags(p) == exact[p], f"{p}: tags differ after restore"
        assert helpers.audio_hash(p) == audio[p], f"{p}: audio changed"
    q = json.loads(tagger(cfg, "query", "--format", "json").stdout)
    assert {r["path"]: r["written_genres"] for r in q} == {str(p): [] for p in files}

    # 7. A restored library stays restored, whatever settings the next scan has.
    for args in ((), ("--policy", "replace")):
        summary = scan(cfg, *args, str(lib))
        assert summary["files"] == [] and summary["counts"]["unchanged"] == len(files), summary
    assert all(helpers.exact_tags(p) == exact[p] for p in files)


def test_wrong_extension_and_whole_reasons(tiny_bundle: Path, excerpts: list[Path], tmp_path: Path) -> None:  # noqa: F811
    """§6: a FLAC named .mp3 and an MP3 named .m4a are tagged as what they are; a file that
    cannot be tagged is reported once, with its path once and its whole reason."""
    lib = tmp_path / "music"
    lib.mkdir()
    flac = lib / "really-flac.mp3"
    shutil.copyfile(helpers.make_audio(excerpts[1], "flac", tmp_path), flac)
    mp3 = lib / "really-mp3.m4a"
    shutil.copyfile(_mp3(excerpts[2], tmp_path / "x.mp3", 4), mp3)
    readonly = lib / "a-read-only-file-with-a-rather-long-name-so-that-reasons-run-long.flac"
    shutil.copyfile(helpers.make_audio(excerpts[0], "flac", tmp_path, name="ro.flac"), readonly)
    readonly.chmod(0o444)
    content = readonly.read_bytes()
    db = tmp_path / "t.db"
    cfg = _config(tmp_path, tiny_bundle, db)
    proc = tagger(cfg, "scan", str(lib), prefix=_without_root_override(), expect=None)
    if proc.returncode == 0:
        pytest.skip("this environment lets us write to a 0o444 file")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # Tagged, as what they are.
    assert FLAC(flac)["GENRE"] and FLAC(flac)["TAGGER_GENRE"]
    assert MP3(mp3).tags["TCON"].text and "TXXX:TAGGER_GENRE" in MP3(mp3).tags
    assert statuses(db) == {str(flac): "tagged", str(mp3): "tagged", str(readonly): "classified"}
    assert readonly.read_bytes() == content
    # The failure: one line naming the file once, and the whole reason in the summary.
    reason = "tag write failed: permission denied"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if str(readonly) in line]
    assert lines == [f"failed {readonly}: {reason}"], lines
    assert f"  1 failed: {reason}" in proc.stdout.splitlines()
    assert "2 tagged" in proc.stdout
    error = rows(db, "SELECT last_error FROM tracks WHERE path = ?", str(readonly))[0]["last_error"]
    assert error == reason
    # The outcome says what the content is (other settings: applied without classifying).
    summary = scan(cfg, "--policy", "replace", str(flac), str(mp3))
    notes = {Path(o["path"]).name: o["reason"] for o in summary["files"]}
    assert notes["really-flac.mp3"].endswith("; FLAC content in a .mp3 file")
    assert notes["really-mp3.m4a"].endswith("; MP3 content in a .m4a file")


def test_marker_of_an_older_tagger_is_narrowed_by_the_database(excerpts: list[Path], tmp_path: Path) -> None:  # noqa: F811
    """A marker written before markers named only tagger's values listed the person's merged
    genres too; the database's merge record tells them apart, so keep refreshes ours only."""
    path = helpers.make_audio(excerpts[0], "flac", tmp_path, name="old.flac")
    f = FLAC(path)
    f["GENRE"] = [*PERSON, "Jazz"]
    f["TAGGER_GENRE"] = ['{"genres":["Post-Rock","Ambient","Jazz"],"model":"old","confidence":0.5}']
    f.save()
    assert read_state(path).marker == Marker(("Post-Rock", "Ambient", "Jazz"), "old", 0.5, legacy=True)
    db = open_db(tmp_path / "t.db")
    try:
        st = path.stat()
        with db.session() as s:
            t = repo.upsert_track(s, str(path), size=st.st_size, mtime=st.st_mtime, status="tagged")
            m = repo.ensure_model(s, "b" * 64, "newer", ["jazz", "rock"])
            repo.record_prediction(s, t.id, m, {"jazz": 0.2, "rock": 0.8}, ["Rock"], 1)
            repo.record_tag_write(s, t.id, policy="merge", before=PERSON, after=[*PERSON, "Jazz"])
        out = Library(db, None, Options(policy="keep", min_confidence=0.0)).reapply(FileStat(str(path), st.st_size, st.st_mtime))
        assert out is not None and out.action == "tagged", out
        state = read_state(path)
        assert state.genres == (*PERSON, "Rock") and state.marker == Marker(("Rock",), "b" * 12, 0.8)
        # Without the record the old marker is taken at its word: the file is ours.
        write_genres(path, [*PERSON, "Jazz"], None)
        f = FLAC(path)
        f["TAGGER_GENRE"] = ['{"genres":["Post-Rock","Ambient","Jazz"],"model":"old","confidence":0.5}']
        f.save()
        assert read_state(path).added == (*PERSON, "Jazz")
    finally:
        db.dispose()


def test_write_ahead_record_of_a_write_that_never_happened_is_not_counted(excerpts: list[Path], tmp_path: Path) -> None:  # noqa: F811
    """kill -9 between the write-ahead record and the file's replace leaves a record of a
    write that never happened; the next write replaces it, so the file is tagged once in
    the database as on disk (and a restore still finds the original)."""
    path = helpers.make_audio(excerpts[0], "flac", tmp_path, name="killed.flac")
    exact = helpers.exact_tags(path)
    db = open_db(tmp_path / "t.db")
    try:
        st = path.stat()
        with db.session() as s:  # what the killed scan left: pending, a prediction, the record
            t = repo.upsert_track(s, str(path), size=st.st_size, mtime=st.st_mtime, status="pending")
            m = repo.ensure_model(s, "c" * 64, "m", ["jazz", "rock"])
            repo.record_prediction(s, t.id, m, {"jazz": 0.1, "rock": 0.9}, ["Rock"], 1)
            repo.record_tag_write(s, t.id, policy="keep", before=[], after=["Rock"], raw_before=read_state(path).raw)
            track_id = t.id
        lib = Library(db, None, Options(min_confidence=0.0))
        out = lib.reapply(FileStat(str(path), st.st_size, st.st_mtime))
        assert out is not None and out.action == "tagged" and read_state(path).genres == ("Rock",)
        with db.session(write=False) as s:
            assert [w.genres_after for w in repo.open_writes(s, track_id)] == [["Rock"]]
        # A record whose write did happen is kept: refreshing ours adds a second one.
        lib.options.top_k = 2
        st = path.stat()
        assert lib.reapply(FileStat(str(path), st.st_size, st.st_mtime)).action == "tagged"
        with db.session(write=False) as s:
            assert [w.genres_after for w in repo.open_writes(s, track_id)] == [["Rock"], ["Rock", "Jazz"]]
        assert [o.action for o in lib.restore(None)] == ["restored"]
        assert helpers.exact_tags(path) == exact
    finally:
        db.dispose()
