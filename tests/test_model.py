"""The model: training end to end (tiny, seconds), checkpoints, bundles, batched inference,
``tagger evaluate``, and the shipped model on real clips."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tagger import features
from tagger.dataset import load_dataset, read_split
from tagger.model.bundle import BundleError, default_bundle_dir, load_bundle
from tagger.model.infer import Classifier, classify
from tagger.model.train import TrainConfig, train_member

TINY_ARCH = {"blocks": [1, 1], "growth": 4, "stem_filters": 8, "bottleneck": 2}
GENRES = ["blues", "classical", "metal"]


def write_png(matrix: np.ndarray, path: Path) -> None:
    """Draw a window the way the training images were drawn (magma, bands bottom-up)."""
    from matplotlib import colormaps
    from PIL import Image

    lut = np.rint(colormaps["magma"](np.arange(256))[:, :3] * 255).astype(np.uint8)
    r = np.arange(features.IMAGE_ROWS)
    band = np.floor((r + 0.5) * features.N_MELS / features.IMAGE_ROWS).astype(int)
    img = lut[matrix[band][::-1]]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, "RGB").save(path)


def synthetic_window(label: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.integers(0, 90, size=(features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    lo = label * 40
    x[lo : lo + 40] += 150
    return x


@pytest.fixture(scope="module")
def png_data(tmp_path_factory) -> Path:
    """A PNG layout (genre folders + splits/) of synthetic windows the model can learn."""
    root = tmp_path_factory.mktemp("pngdata")
    rng = np.random.default_rng(1)
    train, valid = [], []
    for g, genre in enumerate(GENRES):
        for i in range(8):
            name = f"{genre}.{i:05d}"
            write_png(synthetic_window(g, rng), root / genre / f"{name}.png")
            (valid if i >= 6 else train).append(f"{genre}/{name}")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "splits" / "valid.txt").write_text("\n".join(valid) + "\n")
    return root


def test_png_decoding_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    m = rng.integers(0, 256, size=(features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    write_png(m, tmp_path / "x.png")
    assert np.array_equal(features.decode_png(tmp_path / "x.png"), m)


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tagger.cli", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"tagger {' '.join(args)} -> {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def test_train_and_evaluate_end_to_end(png_data, tmp_path):
    out = tmp_path / "bundle"
    run_cli(
        "train", str(png_data), "--valid", str(png_data / "splits" / "valid.txt"),
        "--epochs", "12", "--crop", "96", "--batch-size", "6", "--learning-rate", "0.005", "--mixup", "0", "--no-masks",
        "--arch", json.dumps(TINY_ARCH), "--out", str(out),
    )
    for name in ("model.keras", "model.onnx", "bundle.json", "curves.png", "confusion.png"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["labels"] == GENRES
    assert meta["representation"] == features.representation_params()
    assert meta["training"]["data"]["train"]["clips"] == 18
    assert meta["training"]["data"]["valid"]["clips"] == 6
    assert 0.0 <= meta["metrics"]["valid"]["accuracy"] <= 1.0

    proc = run_cli("evaluate", "--model", str(out), str(png_data), "--split", str(png_data / "splits" / "valid.txt"), "--json", "--plot", str(tmp_path / "cm.png"))
    report = json.loads(proc.stdout)
    assert report["n"] == 6
    assert set(report["per_genre"]) == set(GENRES)
    assert all({"precision", "recall", "support"} <= set(v) for v in report["per_genre"].values())
    assert report["accuracy"] == pytest.approx(meta["metrics"]["valid"]["accuracy"])
    # the bands carry the label: a dozen epochs learn it (chance is 1/3)
    assert report["accuracy"] > 0.5
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = run_cli("evaluate", "--model", str(out), str(png_data)).stdout
    assert "accuracy" in text and "confusion" in text


def test_interrupted_training_resumes_from_checkpoint(png_data, tmp_path):
    ids = read_split(png_data / "splits" / "train.txt")
    ds = load_dataset(png_data, ids)
    cfg = TrainConfig(epochs=1, batch_size=8, crop=64, warmup_epochs=0, arch=TINY_ARCH)
    _, first = train_member(ds, ds, cfg, seed=7, checkpoint_dir=tmp_path)
    assert (tmp_path / "member7.ckpt.npz").is_file()
    cfg.epochs = 3  # "the run was meant to be longer": it continues at epoch 2
    _, history = train_member(ds, ds, cfg, seed=7, checkpoint_dir=tmp_path)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[0] == first[0]


def test_bundle_round_trip_and_refusals(tiny_bundle, tmp_path):
    import shutil

    b = load_bundle(tiny_bundle)
    x = np.random.default_rng(3).integers(0, 256, size=(5, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    p1 = Classifier(b, batch_size=4, workers=0).predict_windows(x)
    again = load_bundle(tiny_bundle)
    p2 = Classifier(again, batch_size=8, workers=0).predict_windows(x)
    assert p1.shape == (5, len(b.labels))
    np.testing.assert_allclose(p1, p2, atol=1e-5)
    np.testing.assert_allclose(p1.sum(axis=1), 1.0, atol=1e-5)
    assert b.sha256 == again.sha256 and len(b.sha256) == 64

    bad = tmp_path / "old"
    shutil.copytree(tiny_bundle, bad)
    meta = json.loads((bad / "bundle.json").read_text())
    meta["representation"]["version"] = features.REPRESENTATION_VERSION + 1
    (bad / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="representation version"):
        load_bundle(bad)
    meta["representation"] = {**features.representation_params(), "n_mels": 96}
    (bad / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="n_mels"):
        load_bundle(bad)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path / "nothing-here")
    meta["representation"] = features.representation_params()
    (bad / "bundle.json").write_text(json.dumps(meta))
    assert load_bundle(bad).sha256 == b.sha256
    (bad / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(BundleError, match="not the file bundle.json records"):
        load_bundle(bad)
    # without the record (nor model.keras) the file is taken as it is, and fails to load
    (bad / "model.keras").unlink()
    (bad / "bundle.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "onnx"}))
    with pytest.raises(BundleError, match="cannot load model.onnx"):
        _ = load_bundle(bad).model


def test_classify_packs_many_files_and_reports_bad_ones(tiny_bundle, synth_audio, tmp_path):
    good = [synth_audio(seconds=s) for s in (6.0, 7.0, 40.0, 95.0)]
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp3"
    text.write_text("not audio\n")
    paths = [good[0], empty, good[1], text, good[2], good[3]]
    results = classify(paths, bundle=tiny_bundle, batch_size=4, max_windows=3, workers=1)
    assert [r.path for r in results] == [str(p) for p in paths]
    ok = [r for r in results if r.ok]
    assert len(ok) == 4
    assert [r.windows for r in ok] == [1, 1, 2, 3]  # 40 s → 2 windows; 95 s → max 3
    for r in ok:
        assert set(r.probabilities) == set(load_bundle(tiny_bundle).labels)
        assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert "empty" in results[1].error
    assert results[3].error and "\n" not in results[3].error
    # the same answers whatever the batch size or worker count (batches are padded, not mixed)
    again = classify(paths, bundle=tiny_bundle, batch_size=64, max_windows=3, workers=0)
    for a, b in zip(results, again, strict=True):
        if a.ok:
            for g in a.probabilities:
                assert a.probabilities[g] == pytest.approx(b.probabilities[g], abs=1e-5)


def test_a_decode_process_killed_costs_no_file(tiny_bundle, synth_audio):
    """kill -9 of a decode process (as the OOM killer does): a new pool decodes the files in
    flight again, one at a time, and every file comes back decoded, in order, no traceback."""
    import os
    import signal

    from tagger.model.infer import Classifier

    paths = [synth_audio(seconds=s) for s in (6.0, 7.0, 9.0, 11.0, 13.0)]
    with Classifier(tiny_bundle, workers=1, max_windows=1) as clf:
        pool = clf._executor()
        assert pool is not None
        victim = pool.submit(os.getpid).result()  # the pool's one process
        os.kill(victim, signal.SIGKILL)
        out = list(clf.decoded(paths))
        assert [d.path for d in out] == [str(p) for p in paths]
        assert all(d.error is None and d.windows is not None for d in out), [d.error for d in out]
        assert clf._pool is not None and clf._pool is not pool


def test_training_from_an_audio_folder_uses_the_feature_cache(tiny_bundle, synth_audio, tmp_path):
    import shutil

    data = tmp_path / "music"
    for genre, secs in (("Jazz", 6.0), ("Rock", 7.0)):
        d = data / genre / "Some Album"
        d.mkdir(parents=True)
        shutil.copy(synth_audio(seconds=secs), d / "01.wav")
        shutil.copy(synth_audio(seconds=secs + 1), d / "02.wav")
    cache = tmp_path / "cache"
    first = load_dataset(data, cache_dir=cache)
    assert first.labels == ["jazz", "rock"] and first.n_clips == 4
    assert len(list(cache.glob("*.npz"))) == 4
    # a second load reads the cache, not the audio: garble the files but keep their
    # size and mtime (the cache key) — decoding them would now fail
    for f in data.rglob("*.wav"):
        st = f.stat()
        f.write_bytes(b"\0" * st.st_size)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_dataset(data, cache_dir=cache)
    assert np.array_equal(first.x, second.x) and not second.failures
    # a changed file (new mtime) is decoded again, and its failure is reported, not fatal
    victim = next(data.rglob("*.wav"))
    os.utime(victim, None)
    third = load_dataset(data, cache_dir=cache)
    assert third.n_clips == 3 and len(third.failures) == 1


# --- the shipped model ----------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    try:
        return load_bundle(default_bundle_dir())
    except BundleError as exc:
        pytest.fail(f"the shipped model must load: {exc}")


def test_shipped_model_metadata(shipped):
    # GTZAN's ten, electronic and the genres the real-music data carries, and "none of mine"
    gtzan = ["blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock"]
    assert set(gtzan) | {"electronic", "other"} <= set(shipped.labels)
    # the shipped model trained on train + valid; its valid figure is the selection run's
    # (its choice among GTZAN's genres)
    valid = shipped.meta["metrics"]["selection_run_valid"]
    assert valid["n"] == 197 and valid["accuracy"] >= 0.6
    assert shipped.meta["training"]["head"]["patches"] == 6 and shipped.meta["training"]["head"]["top"]["members"] == 5
    assert shipped.meta["representation"]["version"] == features.REPRESENTATION_VERSION


def test_shipped_model_on_real_valid_clips(shipped, shared_audio, shared_png):
    """The real audio path (decode → representation → model) on real clips of the valid split.

    The shipped model was trained on train + valid (its recipe chosen on valid first), so
    this checks the audio path end to end, not generalisation.
    """
    valid = set(read_split(shared_png / "splits" / "valid.txt"))
    clips = sorted(p for p in shared_audio.glob("*/*.flac") if f"{p.parent.name}/{p.stem}" in valid)
    assert len(clips) == 49
    results = classify(clips, bundle=shipped, workers=1)
    truth = [p.parent.name for p in clips]
    predicted = [r.ranked()[0][0] for r in results]
    acc = float(np.mean([t == p for t, p in zip(truth, predicted, strict=True)]))
    assert acc >= 0.5, f"accuracy {acc:.2f} on {len(clips)} valid clips (chance is 0.10)"


def test_shipped_model_agrees_with_png_evaluation(shipped, shared_png):
    """``tagger evaluate`` on the PNG layout gives what the model itself gives on those windows."""
    from tagger.dataset import load_dataset

    proc = run_cli("evaluate", str(shared_png), "--split", str(shared_png / "splits" / "valid.txt"), "--json")
    report = json.loads(proc.stdout)
    assert report["n"] == 197
    data = load_dataset(shared_png, read_split(shared_png / "splits" / "valid.txt"))
    probs = shipped.model.run(data.x[:48])[0]
    assert report["accuracy"] >= 0.69  # trained on these clips: at least the honest selection figure
    truth = data.y[:48]
    assert float(np.mean(probs.argmax(1) == truth)) >= 0.69


#: What a path of the training machine looks like (POSIX home, scratch and mount
#: folders; Windows drives), as text or as bytes inside a binary file.
MACHINE_PATH = re.compile(rb"(?<![\w.])(/(?:work|home|root|tmp|Users|mnt|media|srv|scratch|data)/[\w.-]+|[A-Za-z]:\\\\[\w.-]+)")


def machine_paths(path: Path) -> list[str]:
    """Machine paths in a file, and in each member when it is a zip (``model.keras``)."""
    import zipfile

    blobs = [(path.name, path.read_bytes())]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            blobs += [(f"{path.name}:{n}", z.read(n)) for n in z.namelist()]
    return [f"{name}: {m.group(0).decode(errors='replace')}" for name, blob in blobs for m in MACHINE_PATH.finditer(blob)]


def test_machine_path_finder_finds_one(tmp_path: Path) -> None:
    f = tmp_path / "bundle.json"
    f.write_text(json.dumps({"training": {"data": {"source": "/work/shared/data/gtzan-mel-png"}}}))
    assert machine_paths(f) == ["bundle.json: /work/shared"]
    f.write_text(json.dumps({"training": {"data": {"source": "gtzan-mel-png"}, "ratio": "a/b"}}))
    assert machine_paths(f) == []


def test_no_machine_path_in_any_shipped_file() -> None:
    """What the package ships beside its code (the model bundle, data) names no training machine's path."""
    root = Path(features.__file__).resolve().parent
    shipped = [p for p in root.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert any(p.name == "bundle.json" for p in shipped) and any(p.suffix == ".onnx" for p in shipped)
    found = [hit for p in shipped for hit in machine_paths(p)]
    assert found == [], found
