"""The beets plugin (``beetsplug/tagger.py``) in a real beets library.

Every test runs the real ``beet`` (``python -m beets``) on a library in a temporary
directory: real MP3 and FLAC files made from ``../shared`` clips, imported with
``beet import``, classified by the shipped model. What beets stores is read back with
``beet ls``; what the files hold, with mutagen.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("beets", reason="beets is not installed: pip install '.[beets]'")

import helpers  # noqa: E402
from mutagen import File as MutagenFile  # noqa: E402

from tagger import tags  # noqa: E402

ROOT = helpers.ROOT
#: (source clip, format): three MP3s and three FLACs of six genres, none with a genre tag
CLIPS = [("rock", "mp3"), ("classical", "flac"), ("metal", "mp3"), ("jazz", "flac"), ("country", "mp3"), ("blues", "flac")]
HAND = "Bossa Nova"  # the genre a person gave the seventh file
#: how ``beet ls -f`` shows the flexible attributes of an item that has none
UNSET = ["$tagger_confidence", "$tagger_model"]


def make_track(src: Path, fmt: str, out: Path, title: str, genre: str | None = None) -> Path:
    """A 15-second real file in its own album folder, tagged by ffmpeg (no genre unless given)."""
    folder = out / title
    folder.mkdir(parents=True)
    meta = ["-map_metadata", "-1", "-t", "15", "-metadata", f"title={title}", "-metadata", f"artist=Artist {title}", "-metadata", f"album=Album {title}"]
    if genre:
        meta += ["-metadata", f"genre={genre}"]
    return helpers.make_audio(src, fmt, folder, name=f"{title}.{fmt}", extra=tuple(meta))


class Beets:
    """One beets home (``BEETSDIR``): its config, its library, and ``beet`` to run in it."""

    def __init__(self, home: Path, tagger: str):
        self.home = home
        (home / "lib").mkdir(parents=True)
        (home / "config.yaml").write_text(
            f"directory: {home / 'lib'}\nlibrary: {home / 'library.db'}\nplugins: tagger\n"
            f"import:\n  write: yes\n  copy: yes\n  log: {home / 'import.log'}\n"
            f"tagger: {tagger}\n"
        )

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        # This checkout's tagger and beetsplug/tagger.py come first on the path.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "BEETSDIR": str(self.home), "PYTHONPATH": path}
        proc = subprocess.run([sys.executable, "-m", "beets", *args], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"beet {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def rows(self, fmt: str, *query: str) -> dict[str, list[str]]:
        """``beet ls -f '$title|FMT'`` as {title: fields}."""
        out = self("ls", "-f", f"$title|{fmt}", *query).stdout.splitlines()
        return {line.split("|")[0]: line.split("|")[1:] for line in out if line.strip()}

    def paths(self) -> dict[str, Path]:
        return {t: Path(p[0]) for t, p in self.rows("$path").items()}


def file_genres(path: Path) -> list[str]:
    """The genre values the file itself holds (ID3 TCON or Vorbis GENRE), read by mutagen."""
    f = MutagenFile(path)
    if path.suffix == ".mp3":
        return list(f.tags["TCON"].text) if f.tags is not None and "TCON" in f.tags else []
    return list(f.get("genre", []))


def digest(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def music(shared_audio: Path, ffmpeg: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six files without a genre (MP3 and FLAC) and one a person gave a genre."""
    out = tmp_path_factory.mktemp("music")
    files = {f"{g} {fmt}": make_track(shared_audio / g / f"{g}.00002.flac", fmt, out, f"{g} {fmt}") for g, fmt in CLIPS}
    files["kept"] = make_track(shared_audio / "disco" / "disco.00002.flac", "mp3", out, "kept", genre=HAND)
    return files


@pytest.fixture(scope="module")
def shipped() -> tuple[str, dict]:
    """The shipped model's id as the plugin stores it, and its default display names."""
    from tagger.config import TagsConfig
    from tagger.model.bundle import load_bundle

    return load_bundle().sha256[:12], TagsConfig().names


def test_import_then_pretend_changes_nothing_then_tagger_sets_genres(music: dict[str, Path], shipped, tmp_path: Path) -> None:
    beet = Beets(tmp_path, "{auto: no, min_confidence: 0}")
    beet("import", "-A", "-q", *(str(p.parent) for p in music.values()))
    assert beet.rows("$genre") == {t: [HAND if t == "kept" else ""] for t in music}
    paths = beet.paths()
    before_files = digest(list(paths.values()))
    listing = "$genres|$tagger_confidence|$tagger_model|$mtime"
    before_db = beet.rows(listing)

    out = beet("tagger", "-p").stdout
    assert out.count("would set genres") == 6, out
    assert "1 of 7 items already have a genre" in out
    assert beet.rows(listing) == before_db
    assert digest(list(paths.values())) == before_files

    out = beet("tagger").stdout
    assert "6 tagged" in out, out
    genres = beet.rows("$genre")
    assert all(g[0] for g in genres.values()), genres
    assert genres["kept"] == [HAND]
    assert file_genres(paths["kept"]) == [HAND]
    model, names = shipped
    # What the plugin set is what tagger's own library API gives these files.
    from tagger.library import Options
    from tagger.model.infer import classify

    opts = Options(top_k=1, min_confidence=0.0, names=names)
    results = {r.path: r for r in classify([str(paths[t]) for t in music if t != "kept"], workers=1)}
    stored = beet.rows("$genres|$tagger_confidence|$tagger_model")
    for title in music:
        if title == "kept":
            assert stored[title] == [HAND, *UNSET]
            assert tags.read_state(paths[title]).theirs == (HAND,)
            continue
        r = results[str(paths[title])]
        labels, top, _ = opts.choose(r.probabilities)
        assert stored[title] == [opts.display(labels[0]), f"{top:.2f}", model], title
        assert file_genres(paths[title]) == [opts.display(labels[0])], title
        # tagger's own marker, as `tagger scan` writes it: these genres are tagger's, not a person's
        state = tags.read_state(paths[title])
        assert state.ours and state.theirs == () and state.marker.model == model, title
        assert MutagenFile(paths[title], easy=True)["title"] == [title]  # other tags kept
    # Run again: every item now has a genre, so nothing is decoded and nothing changes.
    files = digest(list(paths.values()))
    assert "7 of 7 items already have a genre" in beet("tagger").stdout
    assert digest(list(paths.values())) == files


def test_missing_or_undecodable_file_is_reported_and_skipped(music: dict[str, Path], tmp_path: Path) -> None:
    beet = Beets(tmp_path, "{auto: no, min_confidence: 0}")
    titles = ["rock mp3", "jazz flac", "metal mp3"]
    beet("import", "-A", "-q", *(str(music[t].parent) for t in titles))
    paths = beet.paths()
    paths["rock mp3"].unlink()
    broken = paths["jazz flac"]
    broken.write_bytes(broken.read_bytes()[:9000])  # its tags, then audio cut off mid-frame
    broken_digest = digest([broken])
    proc = beet("tagger")
    assert "1 tagged, 2 failed" in proc.stdout, proc.stdout
    log = proc.stderr
    assert f"{paths['rock mp3']}: cannot read" in log, log
    assert f"{broken}: cannot decode" in log, log
    stored = beet.rows("$genres|$tagger_confidence|$tagger_model")
    assert stored["rock mp3"] == stored["jazz flac"] == ["", *UNSET]
    assert stored["metal mp3"][0] and stored["metal mp3"][1:] != UNSET
    assert digest([broken]) == broken_digest


def test_auto_import_count_min_confidence_and_force(music: dict[str, Path], shipped, tmp_path: Path) -> None:
    """``auto`` (the default) gives imported items without a genre theirs, up to ``count``;
    ``min_confidence`` leaves an item without one; ``--force`` replaces a person's genre."""
    beet = Beets(tmp_path, "{count: 2, min_confidence: 0}")
    titles = ["classical flac", "country mp3", "kept"]
    beet("import", "-A", "-q", *(str(music[t].parent) for t in titles))
    stored = beet.rows("$genres|$tagger_confidence|$tagger_model")
    assert stored["kept"] == [HAND, *UNSET]
    for t in titles[:2]:
        genres, conf, model = stored[t]
        assert len(genres.split("; ")) == 2 and float(conf) > 0 and model == shipped[0], stored

    # A floor just above the least confident item's top genre: that one is reported, not set.
    low = min(titles[:2], key=lambda t: float(stored[t][1]))
    floor = float(stored[low][1]) + 0.01
    (tmp_path / "floor.yaml").write_text(f"tagger: {{min_confidence: {floor}}}\n")
    proc = beet("-c", str(tmp_path / "floor.yaml"), "tagger", "-f", "-p", "^title:kept")
    assert f"no genre for Artist {low} - Album {low} - {low}: low confidence" in proc.stderr, proc.stderr
    assert proc.stdout.count("would set genres") == 1, proc.stdout

    path = beet.paths()["kept"]
    proc = beet("tagger", "--force", "title:kept")
    assert "1 tagged" in proc.stdout, proc.stdout
    genres, _, model = beet.rows("$genres|$tagger_confidence|$tagger_model", "title:kept")["kept"]
    assert HAND not in genres and model == shipped[0]
    assert file_genres(path) == genres.split("; ")  # two genres, each its own tag value
    assert tags.read_state(path).added == tuple(genres.split("; "))
