"""Genre tags on real files of every supported format.

Files are made with ffmpeg from a 5-second excerpt of a shared GTZAN clip,
given ordinary tags and cover art, then tagged through :mod:`tagger.tags` and
read back with mutagen directly: genres as multiple values, the marker, every
other tag and picture unchanged, the ID3 version kept, the decoded audio
bit-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import helpers
import pytest
from mutagen.asf import ASF
from mutagen.flac import FLAC
from mutagen.id3 import ID3, TCON
from mutagen.mp4 import MP4
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis

from tagger import tags
from tagger.tags import (
    FileChanged,
    GenreState,
    Marker,
    TagError,
    decide,
    read_state,
    restore_fields,
    supported,
    write_genres,
)

SEP = "; "
TAGS = {"title": "Test Title", "artist": "Test Artist", "album": "Test Älbum", "date": "2001"}


# name: (extension, ffmpeg codec args, tag family, hand-set genre or None)
FORMATS: dict[str, tuple[str, list[str], str, str | None]] = {
    "mp3-v23": (
        ".mp3",
        ["-c:a", "libmp3lame", "-b:a", "64k", "-id3v2_version", "3"],
        "id3",
        "Blues",
    ),
    "mp3-v24": (
        ".mp3",
        ["-c:a", "libmp3lame", "-b:a", "64k", "-id3v2_version", "4"],
        "id3",
        "Blues",
    ),
    "flac": (".flac", ["-c:a", "flac"], "flac", "Blues"),
    "ogg": (".ogg", ["-c:a", "libvorbis", "-q:a", "0"], "ogg", "Blues"),
    "opus": (".opus", ["-c:a", "libopus", "-b:a", "32k"], "ogg", None),
    "m4a-aac": (".m4a", ["-c:a", "aac", "-b:a", "64k"], "mp4", "Blues"),
    "m4a-alac": (".m4a", ["-c:a", "alac"], "mp4", None),
    "aiff": (".aiff", ["-write_id3v2", "1", "-id3v2_version", "4"], "id3", "Blues"),
    "wav": (".wav", ["-c:a", "pcm_s16le"], "id3", None),  # ID3 chunk (v2.3) added below
    "wma": (".wma", ["-c:a", "wmav2", "-b:a", "64k"], "asf", "Blues"),
}


@pytest.fixture(scope="module")
def source(shared_audio: Path, ffmpeg: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-second untagged WAV excerpt of a shared clip."""
    clip = sorted(shared_audio.glob("*/*.flac"))[0]
    out = tmp_path_factory.mktemp("src") / "source.wav"
    helpers.run_ffmpeg("-t", "5", "-i", clip, "-map_metadata", "-1", "-c:a", "pcm_s16le", out)
    return out


@pytest.fixture(scope="module")
def make_base(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Build each format's tagged original once per module; tests work on copies."""
    cache: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("bases")

    def make(name: str) -> Path:
        if name not in cache:
            ext, codec, family, genre = FORMATS[name]
            out = folder / f"{name}{ext}"
            meta = [a for k, v in TAGS.items() for a in ("-metadata", f"{k}={v}")]
            if genre:
                meta += ["-metadata", f"genre={genre}"]
            helpers.run_ffmpeg("-i", source, *codec, *meta, out)
            helpers.add_art(out, family, TAGS, extras=True)
            cache[name] = out
        return cache[name]

    return make


@pytest.mark.parametrize("name", list(FORMATS))
def test_policies_on_real_file(name: str, make_base: Callable[[str], Path], tmp_path: Path) -> None:
    ext, _, family, hand_genre = FORMATS[name]
    base = make_base(name)
    path = tmp_path / f"track{ext}"
    shutil.copyfile(base, path)
    before = helpers.read_tags(path, family)
    audio_before = helpers.audio_hash(path)
    assert before["pictures"] == 1, "the test should have added cover art"
    assert len(before["others"]) >= 4, "the test file should carry ordinary tags"
    v23 = before["version"] == (2, 3, 0)
    if name in ("mp3-v23", "wav"):
        assert v23
    elif family == "id3":
        assert before["version"] == (2, 4, 0)

    def check(genres: tuple[str, ...], marker: Marker | None) -> None:
        raw = helpers.read_tags(path, family)
        want = ([SEP.join(genres)] if genres else []) if v23 else list(genres)
        assert raw["genres"] == want
        assert raw["marker"] == (marker.dumps() if marker else None)
        assert raw["others"] == before["others"]
        assert raw["version"] == before["version"]
        state = read_state(path)
        assert state == GenreState(genres, marker)
        assert state.ours == (marker is not None)
        assert not list(tmp_path.glob(".*tagger-tmp")), "temporary copy left behind"

    # 1. What a person left in the file.
    state = read_state(path)
    original = (hand_genre,) if hand_genre else ()
    assert state == GenreState(original, None)
    assert not state.ours and state.theirs == original
    kept = decide(state, ["Rock", "Jazz"], "keep")
    if hand_genre:
        assert kept.genres is None and "person" in kept.reason
    else:
        assert kept == (("Rock", "Jazz"), ("Rock", "Jazz"), "file had no genre")
    exact = helpers.exact_tags(path)

    # 2. merge: theirs first, then ours; the marker names ours only.
    merged = decide(state, ["rock", "Jazz", "blues"], "merge")
    if hand_genre:
        assert merged.genres == (hand_genre, "rock", "Jazz") and merged.added == ("rock", "Jazz")
    else:
        assert merged.genres == merged.added == ("rock", "Jazz", "blues")
    m1 = Marker(merged.added, "model-a", 0.61)
    write_genres(path, merged.genres, m1)
    check(merged.genres, m1)
    assert read_state(path).theirs == original

    # 3. keep: what this tool added may be refreshed by a newer model; the person's stays.
    refreshed = decide(read_state(path), ["Metal", "Hard Rock"], "keep")
    assert refreshed.genres == (*original, "Metal", "Hard Rock"), refreshed.reason
    assert refreshed.added == ("Metal", "Hard Rock")
    m2 = Marker(refreshed.added, "model-b", 0.875)
    write_genres(path, refreshed.genres, m2)
    check(refreshed.genres, m2)
    assert decide(read_state(path), ["metal", "hard rock"], "keep").genres is None

    # 4. replace.
    replaced = decide(read_state(path), ["Pop"], "replace")
    assert replaced.genres == replaced.added == ("Pop",)
    write_genres(path, replaced.genres, Marker(replaced.added, "model-b", 0.5))
    check(replaced.genres, Marker(replaced.added, "model-b", 0.5))

    # 5. restore what the person had, exactly as stored.
    restore_fields(path, state.raw)
    check(original, None)
    assert helpers.exact_tags(path) == exact

    assert helpers.audio_hash(path) == audio_before
    if ext == ".mp3":
        assert path.read_bytes()[-128:-125] != b"TAG", "an ID3v1 tag was added"
        assert path.read_bytes()[3] == (3 if v23 else 4)


# --- a person's genres under every sequence of policies (issue "Trust" §2) ------------

PERSON = ("Post-Rock", "Ambient")
FIRST = ("Classical",)  # model A, top-1
SECOND = ("Jazz", "Rock")  # model B, a newer model with top-k 2

#: (first policy, second policy) -> (genres after the first, after the second); the values
#: tagger added are those not in PERSON. Only replace ever removes the person's values.
SEQUENCES = {
    ("keep", "keep"): (PERSON, PERSON),
    ("keep", "merge"): (PERSON, PERSON + SECOND),
    ("keep", "replace"): (PERSON, SECOND),
    ("merge", "keep"): (PERSON + FIRST, PERSON + SECOND),
    ("merge", "merge"): (PERSON + FIRST, PERSON + SECOND),
    ("merge", "replace"): (PERSON + FIRST, SECOND),
    ("replace", "keep"): (FIRST, SECOND),
    ("replace", "merge"): (FIRST, SECOND),
    ("replace", "replace"): (FIRST, SECOND),
}


def _set_person_genres(path: Path, family: str, genres: tuple[str, ...]) -> None:
    """Several genre values, set the way a person's tagger stores them."""
    if family == "id3":
        f = helpers.ID3_CLASSES[path.suffix](path, translate=False)
        v23 = f.tags.version[:2] == (2, 3)
        f.tags.delall("TCON")
        f.tags.add(TCON(encoding=1 if v23 else 3, text=[SEP.join(genres)] if v23 else list(genres)))
        f.save(v2_version=f.tags.version[1], v23_sep=None)
        return
    f = {"flac": FLAC, "mp4": MP4, "asf": ASF}.get(family) or (OggOpus if path.suffix == ".opus" else OggVorbis)
    f = f(path)
    key = {"flac": "GENRE", "ogg": "GENRE", "mp4": "©gen", "asf": "WM/Genre"}[family]
    f.tags[key] = list(genres)
    f.save()


@pytest.mark.parametrize("sequence", list(SEQUENCES), ids="-".join)
@pytest.mark.parametrize("name", list(FORMATS))
def test_policy_sequences_change_only_what_tagger_added(
    name: str, sequence: tuple[str, str], make_base: Callable[[str], Path], tmp_path: Path
) -> None:
    """Two scans, every pair of policies in both orders, the second by a newer model with
    top-k 2: tagger changes or removes only the values it added itself, and its marker
    records exactly those; a restore then gives back every field as it was."""
    ext, _, family, _ = FORMATS[name]
    path = tmp_path / f"track{ext}"
    shutil.copyfile(make_base(name), path)
    _set_person_genres(path, family, PERSON)
    exact, audio = helpers.exact_tags(path), helpers.audio_hash(path)
    others = helpers.read_tags(path, family)["others"]
    state = read_state(path)
    assert state.genres == PERSON and state.theirs == PERSON and state.marker is None
    first_raw = state.raw
    replaced = False
    for policy, model, ours, want in zip(sequence, ("model-a", "model-b"), (FIRST, SECOND), SEQUENCES[sequence], strict=True):
        d = decide(read_state(path), ours, policy)
        if d.genres is not None:
            write_genres(path, d.genres, Marker(d.added, model, 0.5) if d.added else None)
        replaced = replaced or policy == "replace"
        now = read_state(path)
        assert now.genres == want, (policy, now.genres)
        added = tuple(g for g in want if replaced or g not in PERSON)
        assert (now.marker.added if now.marker else ()) == added, "the marker must name exactly what tagger added"
        assert now.added == added and now.theirs == tuple(g for g in want if g not in added)
        if not replaced:
            assert set(PERSON) <= set(now.genres), f"{policy} removed a genre the person set"
        assert helpers.read_tags(path, family)["others"] == others
    restore_fields(path, first_raw)
    assert helpers.exact_tags(path) == exact
    assert helpers.audio_hash(path) == audio


def test_id3v1_is_updated_not_added_or_removed(
    make_base: Callable[[str], Path], tmp_path: Path
) -> None:
    path = tmp_path / "v1.mp3"
    shutil.copyfile(make_base("mp3-v24"), path)
    tags = ID3(path, translate=False)
    tags.save(path, v1=2, v2_version=4)  # add an ID3v1 tag (genre Blues = 0)
    assert path.read_bytes()[-128:-125] == b"TAG"
    write_genres(path, ["Rock", "Jazz"], None)
    data = path.read_bytes()
    assert data[-128:-125] == b"TAG"
    assert data[-1] == 17  # ID3v1 genre index of "Rock": kept in step with ID3v2
    assert data[3] == 4
    assert read_state(path).genres == ("Rock", "Jazz")


def test_untagged_mp3_gets_id3v24(source: Path, tmp_path: Path) -> None:
    path = tmp_path / "bare.mp3"
    helpers.run_ffmpeg("-i", source, "-t", "1", "-c:a", "libmp3lame", "-id3v2_version", "0", path)
    assert path.read_bytes()[:3] != b"ID3"
    assert read_state(path) == GenreState((), None)
    write_genres(path, ["Rock", "Jazz"], Marker(("Rock", "Jazz"), "m", 1.0))
    assert path.read_bytes()[:4] == b"ID3\x04"
    assert ID3(path)["TCON"].text == ["Rock", "Jazz"]


def test_symlink_target_and_mode_are_kept(make_base: Callable[[str], Path], tmp_path: Path) -> None:
    target = tmp_path / "real.flac"
    shutil.copyfile(make_base("flac"), target)
    target.chmod(0o640)
    link = tmp_path / "link.flac"
    link.symlink_to(target)
    write_genres(link, ["Rock"], None)
    assert link.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert FLAC(target)["GENRE"] == ["Rock"]


def _tag_copy(copy: Path) -> None:
    f = FLAC(copy)
    f["GENRE"] = ["Rock"]
    f.save()


def test_file_moved_while_being_tagged_is_not_brought_back(make_base: Callable[[str], Path], tmp_path: Path) -> None:
    """A user (or beets) moves the file while our tagged copy is being made: our copy
    must not be renamed to the old name, which would leave a second, stale file there."""
    path, moved = tmp_path / "a.flac", tmp_path / "b.flac"
    shutil.copyfile(make_base("flac"), path)
    content = path.read_bytes()

    def change(copy: Path) -> None:
        _tag_copy(copy)
        os.rename(path, moved)

    with pytest.raises(FileChanged, match="moved or deleted while being tagged"):
        tags._replace_safely(path, change)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.flac"]  # no a.flac again, no temporary copy
    assert moved.read_bytes() == content


def test_file_edited_while_being_tagged_keeps_the_edit(make_base: Callable[[str], Path], tmp_path: Path) -> None:
    path = tmp_path / "a.flac"
    shutil.copyfile(make_base("flac"), path)

    def change(copy: Path) -> None:
        _tag_copy(copy)
        f = FLAC(path)  # another tagger writes the original meanwhile
        f["COMMENT"] = ["x" * 5000]  # more than FLAC's padding, so the size changes too
        f.save()

    with pytest.raises(FileChanged, match="changed while being tagged"):
        tags._replace_safely(path, change)
    f = FLAC(path)
    assert f["COMMENT"] == ["x" * 5000] and f["GENRE"] == ["Blues"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.flac"]


def test_write_refused_when_file_is_not_as_last_seen(make_base: Callable[[str], Path], tmp_path: Path) -> None:
    path = tmp_path / "a.flac"
    shutil.copyfile(make_base("flac"), path)
    seen = os.stat(path)
    f = FLAC(path)
    f["TITLE"] = ["Edited " * 400]
    f.save()
    content = path.read_bytes()
    with pytest.raises(FileChanged, match="changed since its tags were read"):
        write_genres(path, ["Rock"], None, expect=seen)
    assert path.read_bytes() == content
    write_genres(path, ["Rock"], None, expect=os.stat(path))
    assert FLAC(path)["GENRE"] == ["Rock"]


@contextlib.contextmanager
def _as_nobody() -> Iterator[None]:
    """Drop the effective uid (root only) so permission bits apply again."""
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_read_only_file_raises(make_base: Callable[[str], Path]) -> None:
    # A world-writable directory: renaming over the file would succeed, so only an
    # explicit check can refuse. Made with tempfile (not tmp_path) so that an
    # unprivileged uid can reach it when the tests run as root.
    folder = Path(tempfile.mkdtemp(prefix="tagger-ro-"))
    try:
        folder.chmod(0o777)
        path = folder / "ro.flac"
        shutil.copyfile(make_base("flac"), path)
        path.chmod(0o444)
        content = path.read_bytes()
        identity = _as_nobody if os.geteuid() == 0 else contextlib.nullcontext
        with identity():
            try:
                with path.open("r+b"):
                    pass
            except PermissionError:
                pass
            else:
                pytest.skip("this environment lets us write to a 0o444 file")
            assert read_state(path).genres == ("Blues",)  # reading is fine
            with pytest.raises(TagError, match="permission denied"):
                write_genres(path, ["Rock"], None)
        assert path.read_bytes() == content
        assert [p.name for p in folder.iterdir()] == ["ro.flac"]
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("ext", [".mp3", ".flac", ".m4a", ".ogg", ".wma", ".wav"])
def test_corrupt_file_raises(ext: str, tmp_path: Path) -> None:
    path = tmp_path / f"broken{ext}"
    content = b"this is not audio\n" * 200
    path.write_bytes(content)
    with pytest.raises(TagError) as info:
        read_state(path)
    assert "\n" not in str(info.value)
    with pytest.raises(TagError):
        write_genres(path, ["Rock"], None)
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_unsupported_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert not supported(path)
    assert all(supported(f"x{ext}") for ext, *_ in FORMATS.values())
    assert supported("X.FLAC") and supported("a.opus") and supported("a.aif")
    with pytest.raises(TagError, match="unsupported format"):
        read_state(path)
    with pytest.raises(TagError, match="no such file"):
        read_state(tmp_path / "missing.flac")


# --- decide(): pure policy logic --------------------------------------------------

MINE = Marker(("Rock",), "old-model", 0.7)
BOTH = Marker(("Rock", "Jazz"), "old-model", 0.7)


@pytest.mark.parametrize(
    ("state", "ours", "policy", "expected", "added"),
    [
        # keep
        (GenreState((), None), ["Rock", "Jazz"], "keep", ("Rock", "Jazz"), ("Rock", "Jazz")),
        (GenreState(("Blues",), None), ["Rock"], "keep", None, ()),
        (GenreState(("Rock",), MINE), ["Metal"], "keep", ("Metal",), ("Metal",)),
        (GenreState(("rock",), MINE), ["Metal"], "keep", ("Metal",), ("Metal",)),  # case aside, still ours
        (GenreState(("Blues",), MINE), ["Metal"], "keep", None, ()),  # a person changed ours
        (GenreState(("Rock",), BOTH), ["Metal"], "keep", None, ()),  # a person removed one of ours
        (GenreState(("Rock",), MINE), ["Rock"], "keep", None, ()),  # nothing new
        # ours after a merge, or a person's genre added next to ours: only ours is refreshed
        (GenreState(("Blues", "Rock"), MINE), ["Metal"], "keep", ("Blues", "Metal"), ("Metal",)),
        (GenreState(("Rock", "Blues"), MINE), ["Blues"], "keep", ("Blues",), ()),
        # merge
        (
            GenreState(("Blues", "Soul"), None),
            ["soul", "Rock", "rock"],
            "merge",
            ("Blues", "Soul", "Rock"),
            ("Rock",),
        ),
        (GenreState((), None), ["Rock"], "merge", ("Rock",), ("Rock",)),
        (GenreState(("Rock",), None), ["ROCK"], "merge", None, ()),
        (GenreState(("Blues", "Rock"), MINE), ["Jazz"], "merge", ("Blues", "Jazz"), ("Jazz",)),
        (GenreState(("Rock",), MINE), ["Jazz"], "merge", ("Jazz",), ("Jazz",)),
        # replace: everything written is ours from then on
        (GenreState(("Blues",), None), ["Rock", " Jazz "], "replace", ("Rock", "Jazz"), ("Rock", "Jazz")),
        (GenreState(("Blues", "Rock"), MINE), ["Blues"], "replace", ("Blues",), ("Blues",)),
        (GenreState(("Rock",), None), ["Rock"], "replace", None, ()),
        # nothing to write
        (GenreState(("Blues",), None), ["", "  "], "replace", None, ()),
    ],
)
def test_decide(
    state: GenreState, ours: list[str], policy: str, expected: tuple[str, ...] | None, added: tuple[str, ...]
) -> None:
    result = decide(state, ours, policy)
    assert result.genres == expected
    assert result.added == added
    assert result.reason and "\n" not in result.reason


def test_decide_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="policy"):
        decide(GenreState((), None), ["Rock"], "overwrite")


def test_marker_round_trip_and_tolerance() -> None:
    marker = Marker(("Rock", "Électro"), "densenet-v1", 0.123456789)
    assert Marker.loads(marker.dumps()) == marker
    assert " " not in marker.dumps()
    assert marker.dumps().startswith('{"added":["Rock","Électro"],')
    for junk in (None, "", "Rock", "{}", '{"added":"Rock","model":"m","confidence":1}', "[1,2]"):
        assert Marker.loads(junk) is None
    assert GenreState(("ROCK", "électro"), marker).ours
    assert GenreState(("Post-Rock", "ROCK", "électro"), marker).added == ("ROCK", "électro")
    assert GenreState(("Post-Rock", "ROCK", "électro"), marker).theirs == ("Post-Rock",)
    assert not GenreState(("Rock",), marker).ours
    assert not GenreState(("Rock", "Électro"), None).ours
    # An older tagger's marker listed every value written (a person's merged ones too).
    legacy = Marker.loads('{"genres":["Post-Rock","Rock"],"model":"m","confidence":1}')
    assert legacy == Marker(("Post-Rock", "Rock"), "m", 1.0, legacy=True)
    narrowed = GenreState(("Post-Rock", "Rock"), legacy).with_added(["Rock"])
    assert narrowed.theirs == ("Post-Rock",) and narrowed.marker == Marker(("Rock",), "m", 1.0)


def test_marker_must_match_genres(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="marker"):
        write_genres(tmp_path / "x.flac", ["Rock"], Marker(("Jazz",), "m", 0.5))


def test_a_remote_write_compares_size_and_mtime_only(source: Path, tmp_path: Path) -> None:
    """A cluster node's mount numbers a file its own way: its write checks size and mtime; on
    the machine that looked at the file, device and inode must match too."""
    from tagger.tags.orders import WriteOrder, write_tags

    song = helpers.make_audio(source, "flac", tmp_path, name="song.flac")
    st = song.stat()
    other_numbers = (st.st_dev + 1, st.st_ino + 1, st.st_size, st.st_mtime_ns)
    here = WriteOrder(str(song), ("Jazz",), tags.Marker(("Jazz",), "m", 0.9), "; ", other_numbers)
    assert write_tags(here).changed  # here, other numbers are another file
    assert tags.read_state(song).genres == ()
    written = write_tags(dataclasses.replace(here, remote=True))
    assert not written.changed and written.error is None
    assert tags.read_state(song).genres == ("Jazz",)


def test_two_runs_of_one_write_at_once_both_report_it_written(source: Path, tmp_path: Path) -> None:
    """A Ray write retried while its first run still goes on (a node cut off for a while):
    the run that finds the file changed under it by the other run's identical write reports
    it written, not changed, so the driver keeps its record. Raced on 20 fresh files."""
    import threading

    from tagger.tags.orders import WriteOrder, write_tags

    song = helpers.make_audio(source, "mp3", tmp_path, name="song.mp3")
    for i in range(20):
        copy = tmp_path / f"copy{i}.mp3"
        shutil.copyfile(song, copy)
        st = copy.stat()
        order = WriteOrder(str(copy), ("Jazz",), tags.Marker(("Jazz",), "m", 0.9), "; ", (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), remote=True)
        start = threading.Barrier(2)
        results: list = []

        def run(order: WriteOrder = order, start: threading.Barrier = start, results: list = results) -> None:
            start.wait()
            results.append(write_tags(order))

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [(r.changed, r.error) for r in results] == [(False, None)] * 2, (i, results)
        assert tags.read_state(copy).genres == ("Jazz",)
        assert not list(tmp_path.glob(f".copy{i}.mp3.*"))  # no temporary copy left
