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
from tagger.teacher import load_keras

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


def linked_png_split(data: Path, shared_png: Path, genres: tuple[str, ...], per_genre: int, n_train: int) -> None:
    """A small PNG layout under ``data``: links to the first ``per_genre`` shared windows of
    each genre, the first ``n_train`` of them in splits/train.txt, the rest in valid.txt."""
    (data / "splits").mkdir(parents=True)
    train, valid = [], []
    for genre in genres:
        (data / genre).mkdir()
        for k, png in enumerate(sorted((shared_png / genre).glob("*.png"))[:per_genre]):
            (data / genre / png.name).symlink_to(png)
            (train if k < n_train else valid).append(f"{genre}/{png.stem}")
    (data / "splits" / "train.txt").write_text("\n".join(train) + "\n")
    (data / "splits" / "valid.txt").write_text("\n".join(valid) + "\n")


@pytest.fixture(scope="module")
def tiny_teacher_bundle(tmp_path_factory, shared_png):
    """``tagger train --teacher musicnn`` on 12 real training windows of 3 genres, validated on 6."""
    from click.testing import CliRunner

    from tagger.cli import main

    root = tmp_path_factory.mktemp("teacher-data")
    data = root / "png"
    linked_png_split(data, shared_png, ("classical", "metal", "hiphop"), 6, 4)
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
    km = load_keras(bundle.path)
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


def test_patch_starts_follow_the_teacher_patches():
    """Crop boundaries fall where the teacher's 3-s patches start: a crop's target is its patches' pooling."""
    from tagger.teacher.distill import patch_starts

    b = patch_starts()
    assert b[0] == 0 and len(b) == br.PATCHES_PER_WINDOW + 1
    t = br.column_times()
    patch_s = br.PATCH_FRAMES * br.TEACHER_HOP / br.TEACHER_SAMPLE_RATE
    for p in range(1, br.PATCHES_PER_WINDOW):
        # the first column of patch p shows a time inside patch p, the column before it does not
        assert p * patch_s <= t[b[p]] < (p + 1) * patch_s
        assert t[b[p] - 1] < p * patch_s
    widths = np.diff(b)
    assert widths.min() >= 38 and widths.max() <= 40


def test_crop_targets_pool_the_covered_patches():
    from tagger.teacher.distill import crop_targets

    per = np.arange(2 * 10 * 3, dtype=np.float32).reshape(2, 10, 3)
    got = crop_targets(per, np.array([0, 6]), 4)
    np.testing.assert_allclose(got[0], per[0, 0:4].mean(0))
    np.testing.assert_allclose(got[1], per[1, 6:10].mean(0))


def test_distill_batch_labels_only_labelled_windows():
    """Unlabelled windows add no genre loss; the genre targets average over the labelled part."""
    from tagger.teacher.distill import DistillConfig, distill_batch, patch_starts

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(6, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    y = np.array([0, 2, -1, -1, 1, -1])
    tags = rng.random((6, 10, 50)).astype(np.float16)
    pen = rng.standard_normal((6, 10, 200)).astype(np.float16)
    cfg = DistillConfig(mixup_alpha=0.0, time_masks=0, freq_masks=0)
    xb, (genre, t_tags, t_pen) = distill_batch(x, y, tags, pen, 3, cfg, rng, patch_starts())
    assert xb.dtype == np.uint8 and xb.shape[:2] == (6, features.N_MELS) and 150 <= xb.shape[2] <= 160
    assert np.all(genre[y < 0] == 0)
    np.testing.assert_allclose(genre.sum(), 6.0, rtol=1e-5)  # mean over the 3 labelled rows, times the batch of 6
    assert np.argmax(genre[0]) == 0 and np.argmax(genre[1]) == 2 and np.argmax(genre[4]) == 1
    # each crop's tag target is the mean of exactly the teacher patches it shows
    b = patch_starts()
    for i in range(6):
        first = [p for p in range(7) if np.array_equal(xb[i], x[i, :, b[p] : b[p] + xb.shape[2]])]
        assert first, "crop not aligned to a patch start"
        np.testing.assert_allclose(t_tags[i], tags[i, first[0] : first[0] + 4].astype(np.float32).mean(0), rtol=1e-5)


@needs_musicnn
def test_distilled_route_trains_a_plain_densenet(tmp_path, shared_png):
    """``tagger train --teacher musicnn --distill --extra`` end to end: cached teacher targets, a DenseNet bundle."""
    from click.testing import CliRunner

    from tagger.cli import main
    from tagger.features import decode_png
    from tagger.model.bundle import load_bundle
    from tagger.teacher.branch import PatchCache

    data = tmp_path / "png"
    linked_png_split(data, shared_png, ("classical", "metal"), 4, 3)
    # unlabelled windows: two blues clips, passed as an extra .npz
    extra = np.stack([decode_png(p) for p in sorted((shared_png / "blues").glob("*.png"))[:2]])
    np.savez(tmp_path / "extra.npz", levels=extra)
    out = tmp_path / "student"
    args = ["train", str(data), "--valid", str(data / "splits" / "valid.txt"), "--teacher", "musicnn", "--distill",
            "--extra", str(tmp_path / "extra.npz"), "--epochs", "2", "--finetune-epochs", "2", "--arch", '{"blocks": [2, 2], "growth": 8}', "--out", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "tag agreement with the teacher" in result.output and "fine-tune epoch   2/2" in result.output
    bundle = load_bundle(out)
    assert bundle.meta["training"]["route"].startswith("DenseNet distilled from musicnn")
    assert bundle.meta["training"]["epochs_run"] == [2, 2]
    assert bundle.meta["training"]["data"]["unlabelled_windows"] == 2
    # the bundle is the student's DenseNet alone: no teacher layers, genre probabilities out
    names = {layer.name for layer in load_keras(bundle.path).layers}
    assert "levels_norm" in names and not any("musicnn" in n or "bridge" in n or n.startswith("teacher_") for n in names)
    genre, _ = bundle.model.run(extra)
    np.testing.assert_allclose(genre.sum(axis=1), 1.0, atol=1e-5)
    # the teacher's targets were cached per patch, for the extra windows too
    tags, pen = PatchCache(tmp_path / "teacher-cache").outputs(extra, names=("tags", "penultimate"))
    assert tags.shape == (2, 10, 50) and pen.shape == (2, 10, 200) and tags.min() > 0 and tags.max() < 1
    assert len(list((tmp_path / "teacher-cache").glob("*.npz"))) == 10  # 6 training, 2 validation, 2 extra windows
    # rerunning resumes from the per-epoch checkpoint instead of starting over
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0 and "student epoch" not in again.output and "fine-tune epoch" not in again.output


def test_distill_options_need_the_teacher(tmp_path, shared_png):
    from click.testing import CliRunner

    from tagger.cli import main

    result = CliRunner().invoke(main, ["train", str(shared_png), "--distill", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--distill and --extra need --teacher musicnn" in result.output
    np.savez(tmp_path / "bad.npz", windows=np.zeros((2, 128, 387), np.uint8))
    args = ["train", str(shared_png), "--teacher", "musicnn", "--distill", "--extra", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "bad.npz: no 'levels' array" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()


def test_distill_mixup_pairs_windows_of_the_same_kind():
    """With mixup, every labelled row keeps a full unit of genre target: its partner is labelled too."""
    from tagger.teacher.distill import DistillConfig, distill_batch, patch_starts

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(16, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1])
    tags = rng.random((16, 10, 50)).astype(np.float16)
    pen = rng.standard_normal((16, 10, 200)).astype(np.float16)
    for _ in range(5):
        _, (genre, _, _) = distill_batch(x, y, tags, pen, 4, DistillConfig(mixup_alpha=0.3), rng, patch_starts())
        assert np.all(genre[y < 0] == 0)
        np.testing.assert_allclose(genre[y >= 0].sum(axis=1), 16 / 4, rtol=1e-5)
