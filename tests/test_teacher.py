"""The teacher (musicnn's MSD_musicnn in Keras) and the bridge from our windows to its input.

The equality test compares our port with outputs of musicnn's own TensorFlow-1
code on two real clips (``tests/data/musicnn_reference.npz``, made once by
``scripts/musicnn_reference.py`` in a separate environment). It needs the
``musicnn`` package for the weights (``pip install --no-deps musicnn==0.1.0``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tagger import features
from tagger.teacher import bridge as br

DATA = Path(__file__).parent / "data"
CLIPS = ("blues.00000", "classical.00001")

needs_musicnn = pytest.mark.skipif(
    importlib.util.find_spec("musicnn") is None, reason="musicnn not installed (pip install --no-deps musicnn==0.1.0)"
)


@pytest.fixture(scope="module")
def reference():
    with np.load(DATA / "musicnn_reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def teacher():
    from tagger.teacher.checkpoint import load_musicnn

    return load_musicnn()


@needs_musicnn
@pytest.mark.parametrize("clip", CLIPS)
def test_port_equals_musicnn(teacher, reference, clip):
    """Same input → the same tags, pooled features and penultimate layer as musicnn's code."""
    out = teacher.predict_on_batch(reference[f"{clip}/input"])
    for ours, theirs, tol in (("tags", "taggram", 1e-4), ("mean_pool", "mean_pool", 1e-3), ("max_pool", "max_pool", 1e-3), ("penultimate", "penultimate", 1e-3)):
        got, want = np.asarray(out[ours]), reference[f"{clip}/{theirs}"]
        assert got.shape == want.shape
        scale = max(1.0, float(np.abs(want).max()))
        assert np.max(np.abs(got - want)) <= tol * scale, (ours, float(np.max(np.abs(got - want))))
    # and not by accident: the blues clip is heard as blues
    if clip.startswith("blues"):
        labels = [str(x) for x in reference["labels"]]
        assert labels[int(np.argmax(np.asarray(out["tags"]).mean(axis=0)))] == "blues"


def test_teacher_input_from_audio_matches_musicnn(shared_audio, reference):
    """Our computation of musicnn's input from audio is musicnn's (the calibration target)."""
    import librosa

    y, sr = librosa.load(shared_audio / "blues" / "blues.00000.flac", sr=br.TEACHER_SAMPLE_RATE)
    x = br.teacher_input_from_audio(y, sr)
    want = reference["blues.00000/input"].reshape(-1, br.TEACHER_N_MELS)
    np.testing.assert_allclose(x[: len(want)], want, atol=1e-3)


def test_bridge_keras_layer_equals_numpy_reference():
    """The layer inside models computes exactly the documented numpy function."""
    from tagger.teacher.musicnn import Bridge

    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, (2, features.N_MELS, features.N_COLUMNS)).astype(np.uint8)
    layer = Bridge(2.0, br.PATCHES_PER_WINDOW)
    layer.build((None, features.N_MELS, features.N_COLUMNS))
    layer.set_matrices()
    got = np.asarray(layer(levels))
    want = br.patches(br.bridge(levels, 2.0))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # fewer patches: the evenly spread subset of the same frames
    few = Bridge(2.0, 3)
    few.build((None, features.N_MELS, features.N_COLUMNS))
    few.set_matrices()
    idx = Bridge.patch_indices(3)
    np.testing.assert_allclose(np.asarray(few(levels)), want.reshape(2, 10, br.PATCH_FRAMES, -1)[:, idx].reshape(-1, br.PATCH_FRAMES, br.TEACHER_N_MELS), rtol=1e-4, atol=1e-4)


def test_bridge_on_shared_pairs(shared_audio, shared_png):
    """From a window image alone, the bridge gets close to musicnn's input from the audio."""
    from tagger.teacher.calibrate import calibrate

    cal = calibrate(shared_audio, shared_png, limit=12)
    assert cal.clips == 12
    assert abs(cal.log10_gain - br.DEFAULT_LOG10_GAIN) < 0.5, cal
    assert cal.correlation > 0.8, cal
    json.dumps(cal.to_json())


# --- the shipped route, end to end on a tiny scale ------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher_bundle(tmp_path_factory, shared_png):
    """``tagger train --teacher musicnn`` on 12 real training windows of 3 genres, validated on 6."""
    from click.testing import CliRunner

    from tagger.cli import main

    root = tmp_path_factory.mktemp("teacher-data")
    data = root / "png"
    (data / "splits").mkdir(parents=True)
    train, valid = [], []
    for genre in ("classical", "metal", "hiphop"):
        (data / genre).mkdir()
        for k, png in enumerate(sorted((shared_png / genre).glob("*.png"))[:6]):
            (data / genre / png.name).symlink_to(png)
            (train if k < 4 else valid).append(f"{genre}/{png.stem}")
    (data / "splits" / "train.txt").write_text("\n".join(train) + "\n")
    (data / "splits" / "valid.txt").write_text("\n".join(valid) + "\n")
    out = root / "bundle"
    result = CliRunner().invoke(
        main,
        ["train", str(data), "--valid", str(data / "splits" / "valid.txt"), "--teacher", "musicnn", "--patches", "2", "--embedding-dim", "6", "--out", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "valid accuracy" in result.output
    return out, data


@needs_musicnn
def test_teacher_route_trains_exports_and_classifies_real_audio(tiny_teacher_bundle, shared_audio):
    from tagger.model.bundle import load_bundle
    from tagger.model.infer import classify
    from tagger.teacher.branch import PatchCache, window_features

    out, data = tiny_teacher_bundle
    bundle = load_bundle(out)
    assert bundle.labels == ["classical", "hiphop", "metal"]
    assert bundle.meta["training"]["route"].startswith("frozen musicnn branch")
    assert bundle.meta["onnx"]["outputs"] == {"genre": 3, "embedding": 6}
    # real audio through the ONNX model: classical, metal and hiphop clips heard as themselves
    clips = [shared_audio / g / f"{g}.00001.flac" for g in ("classical", "metal", "hiphop")]
    results = classify(clips, bundle=out, workers=1)
    assert all(r.ok and r.embedding is not None and r.embedding.shape == (6,) for r in results), [r.error for r in results]
    assert sum(r.ranked()[0][0] == g for r, g in zip(results, ("classical", "metal", "hiphop"), strict=True)) >= 2
    # the head the bundle carries is the documented numpy computation on the cached teacher outputs
    from tagger.features import decode_png

    x = np.stack([decode_png(p) for p in sorted((data / "classical").glob("*.png"))[:2]])
    mean, mx = PatchCache(out.parent / "teacher-cache").outputs(x)
    f = window_features(mean, mx, 2)
    onnx_genre, onnx_emb = bundle.model.run(x)
    km = bundle.keras_model()
    k_genre, k_emb = (np.asarray(a) for a in km.predict_on_batch(x))
    np.testing.assert_allclose(onnx_genre, k_genre, atol=1e-4)
    np.testing.assert_allclose(onnx_emb, k_emb, atol=1e-3 * max(1.0, float(np.abs(k_emb).max())))
    assert f.shape == (2, 3012)


def test_shipped_bundle_runs_without_musicnn_tensorflow_or_keras(shared_audio):
    """The shipped model needs neither the teacher's package nor the training stack at run time."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'musicnn', 'tensorflow', 'keras', 'tf2onnx'}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from tagger.model.infer import classify\n"
        f"r = classify([{str(shared_audio / 'metal' / 'metal.00001.flac')!r}], workers=0)[0]\n"
        "assert r.ok, r.error\n"
        "print(r.ranked()[0][0], r.embedding.shape[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    genre, dim = out.stdout.split()
    assert genre == "metal" and int(dim) > 0
