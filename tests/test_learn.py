"""tagger learn, embeddings, learnt heads and tagger similar, on real files and databases.

The end-to-end tests build an owner's library from the shared GTZAN clips
(``helpers.owner_library``: training-split clips tagged with the owner's own names, some
as ID3v1 numbers, validation-split clips untagged), scan it with the shipped model,
learn, scan again with the learnt genres, and check what ends up in the files. They run
the real ``tagger`` command in subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import helpers
import numpy as np
import pytest

from tagger import genres, tags
from tagger.learn import LearnRefused, Reading, Sample, learn, read_library, validate
from tagger.library import walk
from tagger.model.bundle import load_bundle
from tagger.model.head import HeadError, fit_head, load_any, load_head, save_head
from tagger.store import embeddings, repo
from tagger.store.db import downgrade, open_db, upgrade

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "NO_COLOR": "1"}
ENV.pop("TAGGER_CONFIG", None)
#: Runs the CLI and says, at exit, whether TensorFlow or Keras was imported.
NO_TF_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('imported tensorflow' if {m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras'} else 'no tensorflow', file=sys.stderr))\n"
    "from tagger.cli import main\n"
    "main()\n"
)


def tagger(cfg: Path, *args: str, expect: int | None = 0, probe: bool = False) -> subprocess.CompletedProcess:
    """Run the real command (with ``probe``: report whether TensorFlow was imported)."""
    cmd = [sys.executable, "-c", NO_TF_PROBE] if probe else [sys.executable, "-m", "tagger.cli"]
    proc = subprocess.run([*cmd, "--config", str(cfg), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if expect is not None:
        assert proc.returncode == expect, f"tagger {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


rows = helpers.rows


def write_config(path: Path, db: Path, *, model: Path | None = None, extra: str = "") -> Path:
    path.write_text(
        f'[database]\npath = "{db}"\n\n[model]\npath = "{model or ""}"\nworkers = 2\nmax_windows = 1\n\n'
        "[tags]\nmin_confidence = 0.0\n\n"
        "[learn.aliases]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in helpers.OWNER_ALIASES.items()) + extra
    )
    return path


# --------------------------------------------------------------------------- spelling


def test_spellings_fold_into_one_label() -> None:
    same = [["Hip-Hop", "hip hop", "HipHop", "HIP  HOP", "hip_hop"], ["Drum & Bass", "drum and bass", "Drum'n'Bass", "Drum n Bass", "drum + bass"], ["Música Popular", "musica popular"], ["Post-Rock", "post rock", "PostRock"]]
    for spellings in same:
        assert len({genres.key(s) for s in spellings}) == 1, spellings
    assert len({genres.key(s) for s in ("Rock", "Pop", "Rock/Pop", "R&B")}) == 4
    # ID3v1 numbers are named with mutagen's table; 255 is "no genre"
    assert genres.split_values(["(17)", "13", "(9)(13)", "(255)", "  "]) == ["Rock", "Pop", "Metal", "Pop"]
    assert genres.split_values(["1980s Pop"]) == ["1980s Pop"]  # not a number
    # several genres in one value: the first is the label
    assert genres.first_genre(["Rap; Hip Hop"]) == ("Rap", 2)
    assert genres.first_genre(["Rock / Pop"]) == ("Rock", 2)
    assert genres.first_genre(["Drum/Bass"]) == ("Drum/Bass", 1)  # a bare slash is part of a name
    assert genres.first_genre(["Folk, World, & Country"]) == ("Folk", 3)
    assert genres.first_genre(["(17)Rock & Roll"]) == ("Rock", 2)
    assert genres.first_genre([]) == (None, 0)


def test_vocabulary_names_merges_and_drops() -> None:
    spellings = ["Hip Hop"] * 3 + ["hip-hop"] * 2 + ["Rap"] + ["rock"] * 2 + ["Rock"] * 2 + ["Jazz"] + ["Bossa Nova"] * 2
    v = genres.vocabulary(spellings, {"rap": "Hip-Hop", "bossa": "Bossa Nova"}, min_tracks=3)
    # an alias names its label; a tie between spellings goes to the first seen (rock)
    assert [(lab.name, lab.tracks) for lab in v.kept] == [("Hip-Hop", 6), ("rock", 4)]
    hip = v.kept[0]
    assert hip.spellings == {"Hip Hop": 3, "hip-hop": 2, "Rap": 1} and hip.aliased == {"Rap"} and hip.merged
    assert genres.vocabulary(["Rock", "rock", "Rock"]).kept[0].name == "Rock"  # else the most common
    assert [(lab.name, lab.tracks) for lab in v.dropped] == [("Bossa Nova", 2), ("Jazz", 1)]
    assert v.label_of("HIP HOP") is hip and v.label_of("rap") is hip
    assert v.label_of("jazz") is None  # dropped
    # an alias to a spelling of another label merges the two; the alias's name wins
    w = genres.vocabulary(["Hip Hop", "Hip Hop", "Rap"], {"hip hop": "Rap"})
    assert [(lab.name, lab.tracks) for lab in w.kept] == [("Rap", 3)]
    # a loop of aliases ends where it closes instead of hanging
    loop = genres.vocabulary(["a", "b"], {"a": "b", "b": "a"})
    assert sum(lab.tracks for lab in loop.kept) == 2


# --------------------------------------------------------------------------- reading a library


def test_only_genres_a_person_set_are_read(shared_audio: Path, ffmpeg: str, tmp_path: Path) -> None:
    """Real files of several formats: a person's genre, tagger's genre (its marker), both,
    an ID3v1 number, several genres in one value, none; albums from tags or folders."""
    from mutagen.flac import FLAC
    from mutagen.id3 import ID3, TCON

    clip = shared_audio / "rock" / "rock.00001.flac"
    lib = tmp_path / "lib"

    def make(rel: str, fmt: str, album: str | None) -> Path:
        out = lib / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = ("-t", "6", "-map_metadata", "-1", *(("-metadata", f"album={album}", "-metadata", "album_artist=Someone") if album else ()))
        helpers.run_ffmpeg("-i", clip, *meta, *helpers.FORMATS[fmt][1], out)
        return out

    person = make("A/person.flac", "flac", "First Album")
    f = FLAC(person)
    f["GENRE"] = ["Post-Rock", "Ambient"]
    f.save()
    ours = make("A/ours.flac", "flac", "First Album")
    tags.write_genres(ours, ["Rock"], tags.Marker(("Rock",), "abc", 0.9))
    both = make("B/both.m4a", "m4a", "Second Album")
    tags.write_genres(both, ["Shoegaze", "Rock"], tags.Marker(("Rock",), "abc", 0.9))  # a merge: Shoegaze is theirs
    numeric = make("C/numeric.mp3", "mp3", None)
    t = ID3(numeric)
    t.add(TCON(encoding=1, text=["(17)"]))
    t.save(numeric, v2_version=3)
    several = make("C/several.ogg", "ogg", None)
    tags.write_genres(several, ["Rap; Hip Hop"], None)
    wma = make("D/none.wma", "wma", "Third Album")
    broken = lib / "D" / "broken.flac"
    broken.write_bytes(b"fLaC" + b"\0" * 100)

    reading = read_library(walk([lib]))
    got = {Path(s.path).name: (s.spelling, s.genres, s.group) for s in reading.samples}
    assert got == {
        "person.flac": ("Post-Rock", 2, "album:someone/first album"),
        "both.m4a": ("Shoegaze", 1, "album:someone/second album"),
        "numeric.mp3": ("Rock", 1, f"folder:{lib / 'C'}"),
        "several.ogg": ("Rap", 2, f"folder:{lib / 'C'}"),
    }
    assert reading.files == 7 and reading.without == 2  # ours.flac (tagger's only), none.wma
    assert [Path(p).name for p, _ in reading.unreadable] == ["broken.flac"]
    assert reading.several == 2
    assert tags.read_state(wma).genres == ()


def test_validation_holds_out_whole_albums() -> None:
    """Tracks of an album share their sound; labels are random per album. A head that saw
    album mates of a held-out track would look nearly perfect; held out by album it can
    only guess. With each track its own "album" the same data scores near 100 %."""
    rng = np.random.default_rng(0)
    albums, per, labels = 40, 5, ["a", "b", "c", "d"]
    centre = rng.normal(size=(albums, 32)) * 3
    album = np.repeat(np.arange(albums), per)
    y = rng.integers(0, 4, albums)[album]
    x = (centre[album] + rng.normal(scale=0.1, size=(len(album), 32))).astype(np.float32)
    grouped = validate(x, y, [f"album{a}" for a in album], labels, c=1.0)
    assert grouped is not None and grouped.folds == 5 and grouped.groups == albums
    assert grouped.report.n == len(y)  # every track predicted once
    assert grouped.report.accuracy < 0.5
    leaky = validate(x, y, [f"track{i}" for i in range(len(y))], labels, c=1.0)
    assert leaky is not None and leaky.report.accuracy > 0.9
    assert validate(x, y, ["one album"] * len(y), labels) is None  # nothing can be held out


# --------------------------------------------------------------------------- store


def test_embeddings_migration_up_and_down_on_a_real_file(tmp_path: Path) -> None:
    """0002 -> 0003 adds the embeddings table; going back drops it and nothing else (the
    tracks' tag history survives: no table rebuild that would cascade)."""
    path = tmp_path / "t.db"
    assert upgrade(path, "0002") == "0002"
    con = sqlite3.connect(path)
    con.execute("INSERT INTO tracks (id, path, size, mtime, status, first_seen, last_scanned, updated_at) VALUES (1, '/m/a.flac', 1, 1.0, 'tagged', '2025-01-01', '2025-01-01', '2025-01-01')")
    con.execute("INSERT INTO models (id, sha256, name, labels, created_at) VALUES (1, 'abc', 'm', '[]', '2025-01-01')")
    con.execute("INSERT INTO tag_writes (track_id, written_at, policy, genres_before, genres_after, dry_run, restored) VALUES (1, '2025-01-01', 'keep', '[]', '[\"Rock\"]', 0, 0)")
    con.commit()
    con.close()
    assert upgrade(path) == "0003"
    db = open_db(path)
    v = np.linspace(-3, 70000, 180).astype(np.float32)  # beyond float16's range at the top
    with db.session() as s:
        embeddings.store(s, 1, 1, v, 2)
        embeddings.store(s, 1, 1, v * 0.5, 3)  # replaces: one row per track and model
    with db.session(write=False) as s:
        back = embeddings.get(s, 1, 1)
        assert embeddings.count(s) == 1
    db.dispose()
    assert back is not None and back.dtype == np.float32 and back.shape == (180,)
    assert np.allclose(back, np.minimum(v * 0.5, 65504), rtol=1e-3)
    r = rows(path, "SELECT dim, length(vector) AS n, windows FROM embeddings")
    assert r == [{"dim": 180, "n": 360, "windows": 3}]
    assert downgrade(path, "0002") == "0002"
    con = sqlite3.connect(path)
    try:
        names = {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "embeddings" not in names and {"tracks", "tag_writes", "models"} <= names
        assert con.execute("SELECT count(*) FROM tag_writes").fetchone()[0] == 1
        assert con.execute("SELECT path FROM tracks").fetchall() == [("/m/a.flac",)]
    finally:
        con.close()
    assert upgrade(path) == "0003"


def test_stored_embeddings_are_read_back_in_blocks(tmp_path: Path) -> None:
    """More than one block of rows; a row of another size and tracks that are gone are left
    out; every vector comes back as stored (float16), paired with its own track."""
    db = open_db(tmp_path / "t.db")
    rng = np.random.default_rng(0)
    vectors = {}
    with db.session() as s:
        mid = repo.ensure_model(s, "f" * 64, "m", ["a"])
        other = repo.ensure_model(s, "e" * 64, "other", ["a"])
        for i in range(1, 5001):
            t = repo.upsert_track(s, f"/m/{i}.flac", size=1, mtime=1.0, status="tagged")
            v = rng.normal(size=9 if i == 4097 else 8)
            embeddings.store(s, t.id, mid, v, 1)
            embeddings.store(s, t.id, other, v[:3], 1)  # another model: never mixed in
            vectors[t.id] = v.astype(np.float32).astype(np.float16).astype(np.float32)
        repo.mark_missing(s, ["/m/5.flac"])
        repo.mark_failed(s, "/m/6.flac", "no longer decodes")
        repo.mark_removed(s, "/m/4098.flac")
    with db.session(write=False) as s:
        got = list(embeddings.blocks(s, mid, 8))
    db.dispose()
    assert len(got) >= 2
    ids = np.concatenate([i for i, _ in got])
    x = np.concatenate([v for _, v in got])
    assert sorted(ids.tolist()) == sorted(set(range(1, 5001)) - {4097, 5, 6, 4098})
    assert x.dtype == np.float32 and x.shape == (len(ids), 8)
    assert all(np.array_equal(x[k], vectors[int(i)]) for k, i in enumerate(ids))


# --------------------------------------------------------------------------- refusals and heads


def _flac_library(lib: Path, genres_by_name: dict[str, list[str]]) -> list[Path]:
    """Six-second synthetic FLACs, one album folder each, with the genres given."""
    out = []
    for i, (name, values) in enumerate(genres_by_name.items()):
        (lib / f"album{i}").mkdir(parents=True)
        p = helpers.write_synth(lib / f"album{i}" / f"{name}.flac", 6.0, seed=i)
        if values:
            tags.write_genres(p, values, None)
        out.append(p)
    return out


def test_learn_refuses_with_the_reason_and_never_imports_tensorflow(tmp_path: Path) -> None:
    """Real FLAC files and a real database whose embeddings are written through the store."""
    shipped = load_bundle()
    db_path = tmp_path / "tagger.db"
    cfg = write_config(tmp_path / "config.toml", db_path)
    lib = tmp_path / "lib"
    files = _flac_library(lib, {"a": [], "b": []})
    p = tagger(cfg, "learn", str(lib), expect=2)
    assert "none of the 2 files has a genre a person set" in p.stderr
    tags.write_genres(files[0], ["Rock"], None)
    tags.write_genres(files[1], ["Jazz"], tags.Marker(("Jazz",), "x", 0.9))  # tagger's: not learnt from
    p = tagger(cfg, "learn", str(lib), "--min-tracks", "1", expect=2)
    assert "none of the 1 tracks with a genre has an embedding of the model" in p.stderr and "tagger scan --embed" in p.stderr

    more = _flac_library(tmp_path / "lib2", {f"r{i}": ["rock" if i == 3 else "Rock"] for i in range(4)} | {"j0": ["Jazz"], "t0": ["Techno"]})
    rng = np.random.default_rng(0)
    db = open_db(db_path)
    with db.session() as s:
        model_id = repo.ensure_model(s, shipped.sha256, shipped.name, shipped.labels)
        for f in more:
            track = repo.upsert_track(s, str(f), size=f.stat().st_size, mtime=f.stat().st_mtime, status="kept")
            embeddings.store(s, track.id, model_id, rng.normal(size=24) + (5 if "r" in f.name else 0), 1)
    db.dispose()
    p = tagger(cfg, "learn", str(tmp_path / "lib2"), "--min-tracks", "2", expect=2)
    assert "1 genre with at least 2 tracks (Rock (4), Jazz (1), Techno (1)); learning needs two or more" in p.stderr
    out = tmp_path / "head"
    p = tagger(cfg, "learn", str(tmp_path / "lib2"), "--min-tracks", "1", "--out", str(out), "--json", probe=True)
    assert p.stderr.strip().endswith("no tensorflow")
    result = json.loads(p.stdout)
    assert [(k["label"], k["tracks"]) for k in result["kept"]] == [("Rock", 4), ("Jazz", 1), ("Techno", 1)]
    assert result["with_genre"] == 6 and result["validation"]["albums"] == 6
    assert json.loads((out / "head.json").read_text())["base"]["sha256"] == shipped.sha256
    p = tagger(cfg, "similar", str(more[0]), "-n", "2", "--json", probe=True)
    assert p.stderr.strip().endswith("no tensorflow")
    assert len(json.loads(p.stdout)["tracks"]) == 2


def test_a_head_learnt_on_another_base_model_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    shutil.copytree(tiny_bundle, base_dir)
    base = load_bundle(base_dir)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 8)).astype(np.float32), np.arange(30) % 3
    head = fit_head(x, y, 3)
    hb = save_head(tmp_path / "head", head, ["Bossa Nova", "Chanson", "Drum & Bass"], base, name="mine", training={}, metrics={})
    again = load_any(tmp_path / "head")  # found its base at the recorded path, same sha256
    assert again.sha256 == hb.sha256 and again.base.sha256 == base.sha256 and again.labels == hb.labels
    assert np.allclose(again.probabilities(x), head.probabilities(x))
    assert np.allclose(again.probabilities(x).sum(axis=1), 1.0)
    with pytest.raises(HeadError, match=r"learnt on the model tiny-test \(sha256 [0-9a-f]{12}\), the installed model is .*re-run `tagger learn`"):
        load_head(tmp_path / "head", installed=load_bundle())
    # the base model changed under it (a retrained model in the same folder)
    shutil.copyfile(load_bundle().path / "model.keras", base_dir / "model.keras")
    cfg = write_config(tmp_path / "config.toml", tmp_path / "tagger.db")
    (tmp_path / "music").mkdir()
    helpers.write_synth(tmp_path / "music" / "a.flac", 6.0)
    p = tagger(cfg, "scan", "--model", str(tmp_path / "head"), str(tmp_path / "music"), expect=2)
    assert "re-run `tagger learn`" in p.stderr and base.sha256[:12] in p.stderr
    assert not (tmp_path / "tagger.db").exists()  # refused before anything was opened
    # a head is never written into a model bundle's folder
    with pytest.raises(HeadError, match="holds a model bundle"):
        save_head(base_dir, head, ["a", "b", "c"], base, name="x", training={}, metrics={})


def test_learn_from_reading_without_enough_albums_still_learns(tmp_path: Path) -> None:
    """One album only: nothing can be held out, so no validation figure, but a head."""
    shipped = load_bundle()
    db = open_db(tmp_path / "tagger.db")
    samples = []
    rng = np.random.default_rng(1)
    with db.session() as s:
        mid = repo.ensure_model(s, shipped.sha256, shipped.name, shipped.labels)
        for i in range(6):
            path = str(tmp_path / f"t{i}.flac")
            t = repo.upsert_track(s, path, size=1, mtime=1.0, status="kept")
            embeddings.store(s, t.id, mid, rng.normal(size=12) + (i % 2) * 4, 1)
            samples.append(Sample(path, ["Chanson", "Bossa Nova"][i % 2], 1, "album:one"))
    result = learn(db, Reading(samples, files=6), shipped, tmp_path / "head", min_tracks=3)
    assert result.validation is None and result.bundle.labels == ["Bossa Nova", "Chanson"]
    with pytest.raises(LearnRefused, match=r"1 genre with at least 3 tracks \(Chanson \(3\), Bossa Nova \(2\)\)"):
        learn(db, Reading(samples[:5], files=5), shipped, tmp_path / "head2", min_tracks=3)
    assert not (tmp_path / "head2").exists()
    db.dispose()


# --------------------------------------------------------------------------- end to end on real audio


@pytest.fixture(scope="module")
def owner(shared_audio: Path, shared_png: Path, ffmpeg: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The owner's library, scanned once with the shipped model (embeddings stored)."""
    tmp = tmp_path_factory.mktemp("owner")
    records = helpers.owner_library(tmp / "lib")
    before = {r["path"]: helpers.exact_tags(r["path"]) for r in records if r["values"]}
    db = tmp / "tagger.db"
    cfg = write_config(tmp / "config.toml", db)
    first = json.loads(tagger(cfg, "scan", "--json", str(tmp / "lib")).stdout)
    return {"tmp": tmp, "records": records, "before": before, "db": db, "cfg": cfg, "first": first}


@pytest.fixture(scope="module")
def learnt(owner: dict[str, Any]) -> dict[str, Any]:
    """``tagger learn`` on it, then ``tagger scan --model`` with the learnt genres."""
    tmp, cfg = owner["tmp"], owner["cfg"]
    head = tmp / "head"
    out = tagger(cfg, "learn", str(tmp / "lib"), "--min-tracks", "3", "--out", str(head), "--plot", str(tmp / "confusion.png"), "--json")
    text = tagger(cfg, "learn", str(tmp / "lib"), "--min-tracks", "3", "--out", str(tmp / "head-text"))
    second = json.loads(tagger(cfg, "scan", "--json", "--model", str(head), str(tmp / "lib")).stdout)
    return {**owner, "head": head, "learn": json.loads(out.stdout), "learn_text": text.stdout, "second": second}


def _accuracy(records: list[dict[str, Any]], labels: list[str]) -> tuple[int, int, dict[str, list[str]]]:
    """Validation clips whose genre the owner has a label for: how many got that label."""
    right, n, got = 0, 0, {}
    for r in records:
        if r["split"] != "valid":
            continue
        now = list(tags.read_state(r["path"]).genres)
        got[str(r["path"])] = now
        expected = helpers.OWNER_LABELS.get(r["genre"], (None,))[0]
        if expected in labels:
            n += 1
            right += now == [expected]
    return right, n, got


def test_learn_end_to_end_on_real_audio(learnt: dict[str, Any]) -> None:
    res, records, db = learnt["learn"], learnt["records"], learnt["db"]
    # what was read: the 40 files the owner tagged; the 49 tagger tagged in the first scan are not theirs
    assert learnt["first"]["counts"]["failed"] == 0
    assert (res["files"], res["with_genre"], res["without_genre"], res["no_embedding"]) == (89, 40, 49, 0)
    assert res["several_genres"] == sum(1 for r in records if any(";" in v for v in r["values"]))
    kept = {k["label"]: k for k in res["kept"]}
    assert {k: v["tracks"] for k, v in kept.items()} == {"Rock": 10, "Pop": 8, "Rap": 8, "Roots Reggae": 6, "Jazz & Swing": 4, "Heavy": 3}
    assert kept["Rock"]["spellings"] == {"Rock": 5, "rock": 3, "ROCK": 2}  # "(17)" in Vorbis comments is Rock
    assert kept["Pop"]["spellings"] == {"Pop": 8}  # "(13)", "13" and "Pop", in FLAC and in ID3v2.3
    assert kept["Roots Reggae"]["aliased"] == ["reggae"]
    assert kept["Jazz & Swing"]["spellings"] == {"Jazz & Swing": 2, "jazz and swing": 1, "Jazz-and-Swing": 1}
    assert [(d["label"], d["tracks"]) for d in res["dropped"]] == [("Disco", 1)]
    val = res["validation"]
    assert val["folds"] == 5 and val["n"] == 39 and val["accuracy"] > 2 * val["chance"]
    text = learnt["learn_text"]
    assert "dropped 1 genre with fewer than 3 tracks: Disco (1)" in text and "reggae (3, alias)" in text and "precision" in text
    assert (learnt["tmp"] / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the learnt head names its base model and the owner's labels
    head = json.loads((learnt["head"] / "head.json").read_text())
    assert head["base"]["sha256"] == load_bundle().sha256 and head["labels"] == list(kept)
    # the scan with it: every file from its stored embedding, nothing decoded
    second = learnt["second"]
    assert second["notes"] == ["learnt genres given to 89 files from their stored embeddings (no decoding)"]
    # (a clip the shipped model called Rock or Pop and the head too is left as it is)
    assert second["counts"]["tagged"] + second["counts"]["unchanged"] == 49 and second["counts"]["kept"] == 40
    assert second["model"]["sha256"] == res["bundle"]["sha256"]
    # the owner's files are exactly as they were (their genre is theirs: keep)
    for path, before in learnt["before"].items():
        assert helpers.exact_tags(path) == before, path
    # the untagged clips now carry the owner's names; far above chance where the owner has a name
    right, n, got = _accuracy(records, list(kept))
    assert all(len(g) == 1 and g[0] in kept for g in got.values()), got
    assert n == 12 and right / n >= 0.5 and right / n >= 3 / len(kept), (right, n, got)
    print(f"\nlearnt genres on untagged validation clips: {right}/{n} = {right / n:.1%} (chance {1 / len(kept):.1%})")
    # the database: the head's predictions, the base model's embeddings (one per track)
    models = {r["sha256"]: r["id"] for r in rows(db, "SELECT id, sha256 FROM models")}
    base_id, head_id = models[load_bundle().sha256], models[res["bundle"]["sha256"]]
    assert rows(db, "SELECT model_id, count(*) AS n FROM embeddings GROUP BY 1") == [{"model_id": base_id, "n": 89}]
    assert rows(db, "SELECT count(*) AS n FROM predictions WHERE model_id = ?", head_id) == [{"n": 89}]


def test_similar_on_a_real_database(learnt: dict[str, Any]) -> None:
    db, cfg = learnt["db"], learnt["cfg"]
    query = next(r["path"] for r in learnt["records"] if r["genre"] == "metal" and r["split"] == "valid")
    playlist = learnt["tmp"] / "like metal.m3u8"
    out = json.loads(tagger(cfg, "similar", str(query), "-n", "5", "--json", "--playlist", str(playlist)).stdout)
    got = [(t["path"], t["similarity"]) for t in out["tracks"]]
    # the same answer computed here straight from the file: float16 rows, cosine, top 5
    con = sqlite3.connect(db)
    data = con.execute("SELECT t.path, e.vector FROM embeddings e JOIN tracks t ON t.id = e.track_id").fetchall()
    con.close()
    vec = {p: np.frombuffer(v, dtype="<f2").astype(np.float64) for p, v in data}
    q = vec.pop(str(query))
    cos = sorted(((float(v @ q / np.linalg.norm(v) / np.linalg.norm(q)), p) for p, v in vec.items()), reverse=True)[:5]
    assert [p for p, _ in got] == [p for _, p in cos]
    assert np.allclose([s for _, s in got], [s for s, _ in cos], atol=1e-3)
    assert all(t["genres"] == list(tags.read_state(t["path"]).genres) for t in out["tracks"])
    lines = playlist.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#EXTM3U" and lines[2] == str(query) and lines[4::2] == [p for p, _ in got]
    assert lines[1].startswith("#EXTINF:30,")
    text = tagger(cfg, "similar", str(query), "-n", "3").stdout.splitlines()
    assert len(text) == 3 and all("[" in line for line in text)
    p = tagger(cfg, "similar", str(learnt["tmp"] / "nowhere.flac"), expect=1)
    assert "not in the database" in p.stderr and "tagger scan --embed" in p.stderr


def test_new_files_under_a_head_then_back_to_the_base_model(learnt: dict[str, Any]) -> None:
    """A file new to the library is decoded once and named by the head (its embedding kept
    under the base model); switching back to the base model writes its genres again from
    its own stored predictions, never the head's."""
    tmp, cfg, db = learnt["tmp"], learnt["cfg"], learnt["db"]
    labels = learnt["learn"]["bundle"]["labels"]
    src = next(r["path"] for r in learnt["records"] if r["genre"] == "jazz" and r["split"] == "valid")
    new = tmp / "lib" / "New" / "new.flac"
    new.parent.mkdir()
    helpers.run_ffmpeg("-i", src, "-map_metadata", "-1", "-c:a", "flac", new)
    out = json.loads(tagger(cfg, "scan", "--json", "--model", str(learnt["head"]), str(tmp / "lib")).stdout)
    assert out["counts"]["tagged"] == 1 and out["counts"]["unchanged"] == 89 and out["notes"] == []
    assert list(tags.read_state(new).genres)[0] in labels
    r = rows(db, "SELECT m.sha256 FROM embeddings e JOIN tracks t ON t.id = e.track_id JOIN models m ON m.id = e.model_id WHERE t.path = ?", str(new))
    assert r == [{"sha256": load_bundle().sha256}]
    # back to the shipped model: its own predictions, its own names (the new file is decoded)
    back = json.loads(tagger(cfg, "scan", "--json", str(tmp / "lib")).stdout)
    assert back["counts"]["tagged"] + back["counts"]["unchanged"] == 50 and back["counts"]["kept"] == 40
    gtzan = set(load_bundle().labels)
    names = {"Hip-Hop" if g == "hiphop" else g.title() for g in gtzan}
    _, _, got = _accuracy(learnt["records"], [])
    assert all(g and set(g) <= names for g in got.values()), got
    assert set(tags.read_state(new).genres) <= names


def test_the_daemon_tags_with_learnt_genres(learnt: dict[str, Any], tmp_path: Path) -> None:
    from test_daemon import Daemon, wait_until

    music = tmp_path / "music"
    music.mkdir()
    db = tmp_path / "tagger.db"
    cfg = write_config(tmp_path / "config.toml", db, model=learnt["head"])
    cfg.write_text(
        cfg.read_text().replace("[tags]", f'[library]\nfolders = ["{music}"]\n\n[daemon]\nsettle_seconds = 1.0\nmax_wait = 0.5\n\n[tags]')
    )
    d = Daemon(cfg, tmp_path / "daemon.log")
    try:
        d.wait_log(r"ready: watching", 180)
        srcs = [r["path"] for r in learnt["records"] if r["split"] == "valid" and r["genre"] in ("metal", "jazz")][:2]
        for i, src in enumerate(srcs):
            shutil.copyfile(src, music / f"d{i}{src.suffix}")
        done = wait_until(lambda: len(rows(db, "SELECT path FROM tracks WHERE status = 'tagged'")) == 2 and rows(db, "SELECT * FROM tracks"), 120, "two files tagged", proc=d)
        assert done
    finally:
        d.stop()
        d.kill_group()
    labels = learnt["learn"]["bundle"]["labels"]
    for i, src in enumerate(srcs):
        assert list(tags.read_state(music / f"d{i}{src.suffix}").genres)[0] in labels
    assert rows(db, "SELECT DISTINCT m.sha256 FROM predictions p JOIN models m ON m.id = p.model_id") == [{"sha256": learnt["learn"]["bundle"]["sha256"]}]
    assert rows(db, "SELECT DISTINCT m.sha256 FROM embeddings e JOIN models m ON m.id = e.model_id") == [{"sha256": load_bundle().sha256}]


# --------------------------------------------------------------------------- scan --embed


def test_scan_embed_fills_the_gaps_without_touching_tags(tiny_bundle: Path, shared_audio: Path, ffmpeg: str, tmp_path: Path) -> None:
    """Tracks scanned before embeddings were kept (their rows deleted here) get one from
    ``scan --embed``; no file changes, no prediction changes; a new file becomes pending and
    the next scan tags it; a broken file is recorded as failed."""
    lib = tmp_path / "lib"
    lib.mkdir()
    a = helpers.make_audio(shared_audio / "jazz" / "jazz.00001.flac", "flac", lib, extra=("-t", "8", "-metadata", "genre=Bebop"))
    b = helpers.make_audio(shared_audio / "rock" / "rock.00001.flac", "mp3", lib, extra=("-t", "8"))
    db = tmp_path / "tagger.db"
    cfg = write_config(tmp_path / "config.toml", db, model=tiny_bundle)
    tagger(cfg, "scan", str(lib))
    sql = "SELECT t.path, p.created_at, p.probabilities FROM predictions p JOIN tracks t ON t.id = p.track_id ORDER BY 1"
    preds = rows(db, sql)
    con = sqlite3.connect(db)
    con.execute("DELETE FROM embeddings")  # as if scanned before this version
    con.commit()
    con.close()
    c = helpers.make_audio(shared_audio / "metal" / "metal.00001.flac", "m4a", lib, extra=("-t", "8"))
    (lib / "broken.flac").write_bytes(b"fLaC" + b"\0" * 200)
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)}
    out = json.loads(tagger(cfg, "scan", "--embed", "--json", str(lib), expect=1).stdout)
    assert (out["embedded"], out["already"], out["failed"]) == (3, 0, 1)
    assert [Path(f["path"]).name for f in out["failures"]] == ["broken.flac"]
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)} == sha
    assert rows(db, sql) == preds  # no prediction recorded or changed
    emb = {r["path"]: r["dim"] for r in rows(db, "SELECT t.path, e.dim FROM embeddings e JOIN tracks t ON t.id = e.track_id")}
    assert set(emb) == {str(a), str(b), str(c)} and len(set(emb.values())) == 1
    status = {r["path"]: r["status"] for r in rows(db, "SELECT path, status FROM tracks")}
    assert status[str(c)] == "pending" and status[str(lib / "broken.flac")] == "failed"
    again = json.loads(tagger(cfg, "scan", "--embed", "--json", str(lib), expect=1).stdout)
    assert (again["embedded"], again["already"]) == (0, 3)
    final = json.loads(tagger(cfg, "scan", "--json", str(lib)).stdout)  # the broken file: unchanged, not retried
    assert [(Path(f["path"]).name, f["action"]) for f in final["files"]] == [(c.name, "tagged")]
    assert tags.read_state(a).genres == ("Bebop",)
