"""The vocabulary, the label map, label-set training, calibration and abstention."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest

from tagger import vocabulary as V
from tagger.model import partial, scoring

ROOT = Path(__file__).resolve().parents[1]


# --- the label map ------------------------------------------------------------------


def test_label_map_gives_the_sets_a_source_allows():
    assert V.allowed("Pop/Rock") == {"pop", "rock", "metal"}
    assert V.allowed("Electronic; Pop/Rock") == {"electronic", "pop", "rock", "metal"}
    assert V.allowed("Rap") == {"hiphop"}
    assert V.allowed(["R&B"]) == {"rnb"}
    assert V.allowed("Vocal; Jazz") == {"jazz"}  # a cross-cutting name beside a genre is ignored
    assert V.allowed("International") == {V.NONE_LABEL}  # alone: none of our genres fits
    assert V.allowed("Vocal; International") == {V.NONE_LABEL}
    assert V.allowed("Comedy/Spoken") == {V.NONE_LABEL}
    assert V.allowed("Holiday; Pop/Rock") == {"pop", "rock", "metal"}  # a real genre wins over "none"
    assert V.allowed("Klezmer") is None  # not in the table
    # a smaller vocabulary: genres outside it become "none of my genres"
    assert V.allowed("R&B", vocabulary=[*V.GTZAN, V.NONE_LABEL]) == {V.NONE_LABEL}
    assert V.allowed("Electronic; Pop/Rock", vocabulary=["rock", "metal"]) == {"rock", "metal"}
    # spellings fold together
    assert V.allowed("hip-hop") == V.allowed("Hip Hop") == {"hiphop"}


def test_label_map_file_overrides_the_table_and_bad_files_say_why(tmp_path):
    f = tmp_path / "map.toml"
    f.write_text('"Vocal" = ["jazz", "pop"]\n"Klezmer" = "folk"\n')
    table = V.load_label_map(f)
    assert V.allowed("Vocal", table) == {"jazz", "pop"}
    assert V.allowed("Klezmer", table) == {"folk"}
    assert V.allowed("Pop/Rock", table) == {"pop", "rock", "metal"}  # the rest stays
    bad = tmp_path / "bad.toml"
    bad.write_text('"Vocal" = 3\n')
    with pytest.raises(V.LabelMapError, match="must map to a label"):
        V.load_label_map(bad)


def test_display_names():
    assert V.display("rnb") == "R&B" and V.display("newage") == "New Age" and V.display("hiphop") == "Hip-Hop"
    assert V.display("rnb", {"rnb": "Soul"}) == "Soul"
    assert V.display("shoegaze") == "Shoegaze"


# --- label-set training and calibration ---------------------------------------------


def _blobs(n: int, k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (k, d))
    y = rng.integers(0, k, n)
    return centres[y] + rng.normal(0, 1.0, (n, d)), y


def test_label_sets_teach_the_true_label():
    """Each row's set holds its true label and, half the time, a random other one: the head still learns the truth."""
    x, y = _blobs(600, 4, 5, 0)
    rng = np.random.default_rng(1)
    mask = np.zeros((600, 5), bool)  # label 4 is in no set: never chosen
    mask[np.arange(600), y] = True
    noisy = rng.random(600) < 0.5
    mask[np.where(noisy)[0], rng.integers(0, 4, 600)[noisy]] = True
    coef, intercept = partial.fit_softmax(x, mask, l2=1e-3)
    xt, yt = _blobs(400, 4, 5, 0)  # same centres (same seed), new draws
    pred = (xt @ coef.T + intercept).argmax(axis=1)
    assert np.mean(pred == yt) > 0.95
    assert intercept[4] == -30.0 and not coef[4].any()
    with pytest.raises(ValueError, match="at least one label"):
        partial.fit_softmax(x[:3], np.zeros((3, 5), bool))


def test_temperature_undoes_overconfidence():
    """Labels drawn from softmax(z); logits handed over as 2.5·z: the fitted temperature is about 2.5."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (20000, 6))
    p = partial.softmax(z)
    y = (p.cumsum(axis=1) > rng.random((20000, 1))).argmax(axis=1)
    mask = np.zeros_like(p, bool)
    mask[np.arange(len(y)), y] = True
    t = partial.fit_temperature(2.5 * z, mask)
    assert 2.3 < t < 2.7
    assert partial.set_nll(2.5 * z, mask, t) < partial.set_nll(2.5 * z, mask, 1.0)


def test_prior_shift_leans_against_the_genre_the_model_favours():
    """A model that calls genre 0 on most windows: the shift lowers genre 0's logit and raises the
    rare ones', less so for a smaller shift; no shift, no bias; the temperatures are as without."""
    import dataclasses

    from tagger.teacher.branch import HeadConfig
    from tagger.teacher.mixed import calibrated_logits, prior_bias

    rng = np.random.default_rng(1)
    z = rng.normal(0, 1, (4000, 4)) + np.array([1.5, 0.0, 0.0, -1.0])
    b = prior_bias(z, 0.5)
    assert abs(b.sum()) < 1e-9 and b[0] < 0 < b[3] and b[3] > b[1]
    np.testing.assert_allclose(prior_bias(z, 0.25), b / 2)
    before, after = partial.softmax(z).mean(0), partial.softmax(z + b).mean(0)
    assert after[0] < before[0] and after[3] > before[3] and after.std() < before.std()

    y = partial.softmax(z).argmax(1)
    mask = np.zeros_like(z, bool)
    mask[np.arange(len(y)), y] = True
    keep = np.ones(len(z), bool)
    off = HeadConfig(top_weight=0.0)
    on = dataclasses.replace(off, prior_shift=0.5)
    z_off, z_on = calibrated_logits(z, None, mask, keep, off), calibrated_logits(z, None, mask, keep, on)
    assert off.prior_bias is None and on.temperature == off.temperature
    np.testing.assert_allclose(z_on - z_off, np.broadcast_to(on.prior_bias, z.shape))
    np.testing.assert_allclose(on.prior_bias, prior_bias(z_off, 0.5))


def test_scoring_counts_right_wrong_and_nothing():
    labels = ["jazz", V.NONE_LABEL, "rock"]
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.5, 0.0, 0.5 - 1e-6], [0.1, 0.1, 0.8]])
    allowed = [frozenset({"jazz"}), frozenset({"jazz"}), frozenset({"rock"}), frozenset({"pop", "rock", "metal"})]
    r = scoring.outcomes(probs, labels, allowed, 0.0)
    # row 0 right, row 1 "none" (nothing), row 2 writes jazz (wrong), row 3 right
    assert (r["right"], r["wrong"], r["nothing"], r["precision"]) == (0.5, 0.25, 0.25, 2 / 3)
    r = scoring.outcomes(probs, labels, allowed, 0.85)
    assert (r["right"], r["wrong"], r["nothing"]) == (0.25, 0.0, 0.75)
    rows = scoring.curve(probs, labels, allowed, (0.0, 0.6, 0.85))
    assert scoring.choose_threshold(rows, 0.99) == 0.6
    tp, tracks = scoring.track_mean(np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.8]]), ["a", "b", "a"])
    assert tracks == ["a", "b"] and np.allclose(tp, [[0.6, 0.4], [0.0, 1.0]])


# --- tagger train on mixed data, end to end, and abstention in a real scan ----------

def _musicnn_present() -> bool:
    try:
        from tagger.teacher.checkpoint import checkpoint_prefix

        checkpoint_prefix()
        return True
    except Exception:
        return False


def test_tops_mixup_mixes_windows_and_their_label_sets():
    """A mixed batch is λ·own + (1-λ)·other with λ ≥ 0.5, and its loss weighs the two sets by λ."""
    pytest.importorskip("keras")
    from keras import ops

    from tagger.teacher.top import _batches, _mixed_set_loss, _set_loss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 10, 4)).astype(np.float32)
    mask = np.eye(4, dtype=bool)[np.arange(8) % 4]
    x_b, y_b = next(_batches(x, mask, 8, 1, 10, np.random.default_rng(1), mixup_alpha=0.4))
    lam = y_b[:, 8]
    assert (lam >= 0.5).all() and (lam < 1).any()
    order = next(_batches(x, mask, 8, 1, 10, np.random.default_rng(1)))[0]  # the same draws unmixed
    for i in range(8):  # mixed with some window j of the batch, whose label set comes with it
        fits = [j for j in range(8) if np.allclose(x_b[i], lam[i] * order[i] + (1 - lam[i]) * order[j], atol=1e-6)]
        assert any(np.array_equal(y_b[i, 4:8], mask[j]) for j in fits)
    assert np.array_equal(y_b[:, :4], mask.astype(np.float32))
    z = rng.normal(size=(8, 4)).astype(np.float32)
    a, b = mask.astype(np.float32), np.roll(mask, 1, axis=0).astype(np.float32)
    for w in (1.0, 0.7):
        y = np.concatenate([a, b, np.full((8, 1), w, np.float32)], axis=1)
        want = w * float(ops.convert_to_numpy(_set_loss(a, z))) + (1 - w) * float(ops.convert_to_numpy(_set_loss(b, z)))
        assert float(ops.convert_to_numpy(_mixed_set_loss(y, z))) == pytest.approx(want, rel=1e-5)


def test_folds_keep_each_artist_whole_and_another_fold_seed_draws_them_anew():
    """Artist-grouped folds: a group never straddles two folds; ``fold_seed`` redraws the folds
    (``benchmarks/real_music.py --fold-seed``) and every held-out logit comes from a head fitted
    without that window's artist."""
    pytest.importorskip("keras")
    pytest.importorskip("sklearn")
    from tagger.teacher import mixed
    from tagger.teacher.branch import HeadConfig

    groups = [f"artist-{i // 3}" for i in range(60)]  # 20 artists, 3 windows each
    a, b = mixed.grouped_folds(groups, 4, seed=0), mixed.grouped_folds(groups, 4, seed=1)
    for fold in (a, b):
        assert sorted(set(fold)) == [0, 1, 2, 3]
        for g in set(groups):
            assert len({int(f) for f, h in zip(fold, groups, strict=True) if h == g}) == 1
    assert np.array_equal(a, mixed.grouped_folds(groups, 4, seed=0))
    assert not np.array_equal(a, b)

    # Each artist's windows sit near its own point, labelled by its artist's genre: a head
    # that saw the artist places it better than one that did not.
    rng = np.random.default_rng(0)
    artist_genre = rng.integers(0, 3, size=20)
    centres = rng.normal(size=(20, 6)) * 2
    f = (centres[np.arange(60) // 3] + rng.normal(size=(60, 6)) * 0.1).astype(np.float32)
    mask = np.eye(3, dtype=bool)[artist_genre[np.arange(60) // 3]]
    keep = np.ones(60, bool)
    cfg = HeadConfig(embedding_dim=4, l2=0.01, seed=0)
    lin0, top0 = mixed.held_out(f, None, mask, keep, groups, cfg, None, 4)
    lin1, _ = mixed.held_out(f, None, mask, keep, groups, cfg, None, 4, fold_seed=1)
    assert top0 is None
    # the default draw is the recipe's own seed; another seed, other folds, other logits
    assert np.allclose(lin0, mixed.held_out(f, None, mask, keep, groups, cfg, None, 4, fold_seed=0)[0])
    assert not np.allclose(lin0, lin1)
    # held out: fitted without the window's artist, each held-out window's logits differ
    # from those of a head fitted on every window
    seen = mixed.fit_head(f, mask, cfg).logits(f)
    assert not np.allclose(seen, lin1, atol=1e-3)
    own = [i for i in range(60) if b[i] == 0]
    refit = mixed.fit_head(f[b != 0], mask[b != 0], cfg).logits(f[own])
    assert np.allclose(refit, lin1[own], atol=1e-5)


@pytest.fixture(scope="module")
def mixed_bundle(tmp_path_factory, shared_png):
    """``tagger train --teacher musicnn --labelled``: GTZAN folders of 3 genres plus labelled windows.

    The labelled windows are reggae clips that their "source" calls ``Holiday`` (outside
    every vocabulary: "none of my genres") and metal clips it calls ``Pop/Rock``.
    """
    if not _musicnn_present():
        pytest.skip("musicnn weights not installed (pip install --no-deps musicnn==0.1.0)")
    from click.testing import CliRunner

    from tagger.cli import main
    from tagger.features import decode_png

    root = tmp_path_factory.mktemp("mixed")
    data = root / "png"
    (data / "splits").mkdir(parents=True)
    train = []
    for genre in ("classical", "hiphop", "metal"):
        (data / genre).mkdir()
        for png in sorted((shared_png / genre).glob("*.png"))[:4]:
            (data / genre / png.name).symlink_to(png)
            train.append(f"{genre}/{png.stem}")
    (data / "splits" / "train.txt").write_text("\n".join(train) + "\n")
    pngs = [("reggae", p, "Holiday", "artist-r") for p in sorted((shared_png / "reggae").glob("*.png"))[:6]]
    pngs += [("metal", p, "Pop/Rock", "artist-m") for p in sorted((shared_png / "metal").glob("*.png"))[4:8]]
    levels = np.stack([decode_png(p) for _, p, _, _ in pngs])
    ids = np.array([f"src/{p.stem}" for _, p, _, _ in pngs])
    np.savez(root / "extra.npz", levels=levels, ids=ids)
    with (root / "extra.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "source", "genres", "artist"])
        for i, (_, _, g, a) in zip(ids, pngs, strict=True):
            w.writerow([i, "test", g, a])
    out = root / "bundle"
    args = ["train", str(data), "--teacher", "musicnn", "--labelled", str(root / "extra.npz"), "--vocabulary", "classical,hiphop,metal,pop,rock,other",
            "--patches", "2", "--embedding-dim", "8", "--l2", "0.01", "--cv", "2",
            "--members", "2", "--epochs", "3", "--mixup", "0.3", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "cross-validated real music" in result.output
    return out


def test_mixed_training_writes_a_calibrated_bundle_with_the_vocabulary(mixed_bundle):
    from tagger.model.bundle import load_bundle

    b = load_bundle(mixed_bundle)
    assert b.labels == ["classical", "hiphop", "metal", "pop", "rock", "other"]
    t = b.meta["training"]
    assert t["head"]["temperature"] > 0
    assert t["head"]["top"]["mixup_alpha"] == 0.3  # --mixup reaches the tops on this route
    assert t["head"]["mel_stats"] is True  # the default: the head reads the window's mel statistics,
    assert t["head"]["patch_std"] is True and t["head"]["band_corr"] is True  # the patches' spread, the bands' correlations
    assert t["head"]["prior_shift"] == 0.25 and len(t["head"]["prior_bias"]) == 6  # the default shift, fitted in the cross-validation
    assert "cv" in b.meta["metrics"] and b.meta["metrics"]["cv"]["folds"] == 2
    assert t["data"]["labelled"]["windows"] == 10 and t["data"]["labelled"]["groups"] == 2
    assert (mixed_bundle / "precision.png").stat().st_size > 1000
    assert "/" not in t["data"]["source"]  # a name, not the training machine's path
    made = str(mixed_bundle.parent)  # the folders of the "training machine"
    assert made not in (mixed_bundle / "bundle.json").read_text()
    assert all(made.encode() not in (mixed_bundle / f).read_bytes() for f in ("model.keras", "model.onnx"))
    # the export pooled musicnn's five front-end branches before their batch norms (docs/model.md)
    import onnx

    graph = onnx.load(str(mixed_bundle / "model.onnx")).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    assert sum(n.op_type == "ReduceMax" and made_by.get(n.input[0]) == "Conv" for n in graph.node) == 5


def _tagger(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    """The real command under ``cfg``, with no $TAGGER_CONFIG from outside."""
    env = {k: v for k, v in os.environ.items() if k != "TAGGER_CONFIG"}
    return subprocess.run([sys.executable, "-m", "tagger.cli", "--config", str(cfg), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _scan(tmp_path: Path, lib: Path, settings: str) -> tuple[list[dict], Path, Path]:
    """``tagger scan --json LIB`` on a new database with ``settings`` (TOML lines after ``[database]``):
    the files' outcomes, the database and the config."""
    db = tmp_path / "t.db"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[database]\npath = "{db}"\n{settings}')
    proc = _tagger(cfg, "scan", "--json", str(lib))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)["files"], db, cfg


def test_track_outside_the_vocabulary_is_recorded_not_tagged(mixed_bundle, shared_audio, ffmpeg, tmp_path):
    """A reggae song (the model's "other") gets no genre, status ``untagged`` and the reason; a metal song is tagged."""
    lib = tmp_path / "lib"
    lib.mkdir()
    reggae = lib / "reggae.mp3"
    metal = lib / "metal.flac"
    helpers.run_ffmpeg("-i", shared_audio / "reggae" / "reggae.00001.flac", "-c:a", "libmp3lame", "-q:a", "5", reggae)
    shutil.copy(shared_audio / "metal" / "metal.00001.flac", metal)
    before = helpers.exact_tags(reggae)
    files, db, cfg = _scan(tmp_path, lib, f'[model]\npath = "{mixed_bundle}"\nworkers = 1\n[tags]\nmin_confidence = 0.0\n')
    out = {Path(f["path"]).name: f for f in files}
    assert out["reggae.mp3"]["action"] == "no-genre", out
    assert "none of the model's genres" in out["reggae.mp3"]["reason"]
    assert out["metal.flac"]["action"] == "tagged" and out["metal.flac"]["genres"] == ["Metal"]
    assert helpers.exact_tags(reggae) == before  # nothing written
    track = helpers.rows(db, "SELECT status, last_error FROM tracks WHERE path = ?", str(reggae))[0]
    assert track["status"] == "untagged" and "none of the model's genres" in track["last_error"]
    show = _tagger(cfg, "show", str(reggae))
    assert "untagged" in show.stdout and "none of the model's genres" in show.stdout


def test_low_confidence_is_recorded_with_its_reason(shared_audio, tmp_path):
    """With the shipped model and min_confidence 0.999 nothing is written, and the database says why."""
    lib = tmp_path / "lib"
    lib.mkdir()
    song = lib / "blues.flac"
    shutil.copy(shared_audio / "blues" / "blues.00002.flac", song)
    before = helpers.exact_tags(song)
    (f,), db, _ = _scan(tmp_path, lib, "[model]\nworkers = 1\n[tags]\nmin_confidence = 0.999\n")
    assert f["action"] in ("low-confidence", "no-genre") and f["genres"] == []
    assert helpers.exact_tags(song) == before
    track = helpers.rows(db, "SELECT status, last_error FROM tracks")[0]
    assert track["status"] == "untagged" and track["last_error"]


def test_a_stricter_min_confidence_leaves_tagger_s_earlier_genre_and_says_so(shared_audio, tmp_path):
    """A file tagger tagged, rescanned where the model now abstains: nothing written or taken
    out, the status stays ``tagged`` (what the file holds) with the reason; a dry run first
    changes neither the status nor the settings the next real scan applies."""
    lib = tmp_path / "lib"
    lib.mkdir()
    song = lib / "blues.flac"
    shutil.copy(shared_audio / "blues" / "blues.00002.flac", song)
    (f,), db, cfg = _scan(tmp_path, lib, "[model]\nworkers = 1\n[tags]\nmin_confidence = 0.0\n")
    assert f["action"] == "tagged", f
    tagged = helpers.exact_tags(song)
    status = "SELECT status, last_error, tag_settings FROM tracks"
    (settled,) = helpers.rows(db, status)
    assert settled["status"] == "tagged" and settled["tag_settings"]

    dry = _tagger(cfg, "scan", "--json", "--dry-run", "--min-confidence", "0.999", str(lib))
    assert dry.returncode == 0, dry.stderr[-2000:]
    (d,) = json.loads(dry.stdout)["files"]
    assert d["action"] in ("low-confidence", "no-genre") and "keeps tagger's earlier genre" in d["reason"], d
    (row,) = helpers.rows(db, status)
    assert row["status"] == "tagged" and row["tag_settings"] is None  # unsettled: the real scan applies it
    assert helpers.exact_tags(song) == tagged

    real = _tagger(cfg, "scan", "--json", "--min-confidence", "0.999", str(lib))
    assert real.returncode == 0, real.stderr[-2000:]
    (r,) = json.loads(real.stdout)["files"]
    assert r["action"] in ("low-confidence", "no-genre"), r
    assert helpers.exact_tags(song) == tagged  # nothing written, nothing taken out
    (row,) = helpers.rows(db, status)
    assert row["status"] == "tagged" and "keeps tagger's earlier genre" in row["last_error"]
    assert row["tag_settings"] and row["tag_settings"] != settled["tag_settings"]


def test_shipped_model_has_the_larger_vocabulary_and_calibration():
    from tagger.model.bundle import load_bundle

    b = load_bundle(None)
    assert {"electronic", V.NONE_LABEL, *V.GTZAN} <= set(b.labels)
    cv = b.meta["metrics"]["cv"]
    assert cv["real_music"]["min_confidence"] > 0 and 0.3 < cv["temperature"] < 3


def test_fine_tuned_tops_in_the_shipped_graph_equal_the_recipe():
    """The Keras graph (exported to ONNX), built from the folded head (reading musicnn's features, their
    spread over the patches, the mel statistics and the band correlations) and tops, pools them exactly
    as training scored them (weights, temperatures and the prior shift's bias included)."""
    if not _musicnn_present():
        pytest.skip("musicnn weights not installed (pip install --no-deps musicnn==0.1.0)")
    import keras

    from tagger import features
    from tagger.teacher import bridge as br
    from tagger.teacher.branch import Head, HeadConfig, build_branch_model
    from tagger.teacher.checkpoint import load_musicnn
    from tagger.teacher.melstats import BAND_PAIRS, MEL_STATS, band_correlation, mel_stats
    from tagger.teacher.mixed import Fitted
    from tagger.teacher.musicnn import Bridge
    from tagger.teacher.top import Top, interleave, musicnn_top_weights

    rng = np.random.default_rng(3)
    k, dim, patches = 4, 6, 2
    n = 3012 + 1506 + MEL_STATS + BAND_PAIRS  # musicnn's pooled features (mean, max; std), the mel statistics, the band correlations
    head = Head(rng.normal(size=n), rng.uniform(0.5, 2, n), rng.normal(size=(dim, n)) / 50, rng.normal(size=n), rng.normal(size=(k, dim)), rng.normal(size=k))
    musicnn = load_musicnn()
    w = musicnn_top_weights(musicnn)
    tops = [Top(w["pool_bn"], w["penultimate"], w["penultimate_bn"], [rng.normal(size=(200, k)) / 10, rng.normal(size=k)]) for _ in range(2)]
    cfg = HeadConfig(patches=patches, top_weight=0.3, linear_temperature=1.3, top_temperature=0.8, temperature=1.1, mel_stats=True, patch_std=True, band_corr=True,
                     prior_shift=0.25, prior_bias=list(rng.normal(size=k)))  # fmt: skip
    fitted = Fitted(head, tops, cfg)
    folded_head, folded_tops = fitted.folded()
    model = build_branch_model(musicnn, folded_head, cfg, k, tops=folded_tops)
    x = rng.integers(0, 256, size=(3, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    genre = np.asarray(model.predict_on_batch(x)[0])
    # the recipe's side: the teacher's pools of the same patches, then numpy
    inp = keras.Input((features.N_MELS, features.N_COLUMNS), dtype="uint8")
    b = Bridge(br.DEFAULT_LOG10_GAIN, patches)
    out = musicnn(b(inp))
    b.set_matrices()
    mean, mx = (np.asarray(a).reshape(3, patches, 753) for a in keras.Model(inp, [out["mean_pool"], out["max_pool"]]).predict_on_batch(x))
    per = np.concatenate([mean, mx], -1)
    f = np.concatenate([per.mean(1), per.max(1), per.std(1), mel_stats(x), band_correlation(x)], -1)
    z = fitted.logits(f, interleave(mean, mx))
    assert Bridge.patch_indices(patches) == [2, 7]
    np.testing.assert_allclose(genre, partial.softmax(z), atol=2e-4)


def test_a_shortfall_never_reads_as_equal_or_reversed():
    """The reason recorded for a low-confidence track shows the probability below the threshold."""
    from tagger.library import Options

    assert Options(min_confidence=0.6).shortfall(0.41) == "0.41 < 0.60"
    assert Options(min_confidence=0.6).shortfall(0.597) == "0.597 < 0.600"  # not 0.60 < 0.60
    assert Options(min_confidence=0.999).shortfall(0.36) == "0.360 < 0.999"  # not 0.36 < 1.00
    assert Options(min_confidence=0.6).shortfall(0.5999999) == "0.5999999 < 0.6"


def test_evaluate_names_the_label_for_a_folder_named_as_sources_name_it(tmp_path):
    """``Hip-Hop/`` is refused in one line that names the folder name to use, and the model's labels."""
    data = tmp_path / "data"
    for name in ("Hip-Hop", "jazz", "Polka"):
        (data / name).mkdir(parents=True)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[database]\npath = "{tmp_path / "t.db"}"\n')
    proc = _tagger(cfg, "evaluate", str(data))
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "hip-hop (name the folder hiphop)" in line and "polka" in line and "jazz," not in line.split(";")[0]
    assert "its labels: blues, classical" in line
