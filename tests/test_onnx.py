"""The model on ONNX Runtime: the export equals Keras, bundles stay consistent, and the
run-time commands (scan, query, serve) never load TensorFlow or Keras.

Export tests need the ``train`` extra (``scripts/test.sh`` installs it); they skip
with a reason without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tagger import features
from tagger.model.bundle import BundleError, default_bundle_dir, file_sha256, load_bundle
from tagger.model.infer import Classifier, classify
from tagger.model.runtime import OnnxModel
from tagger.teacher import load_keras

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("TAGGER_CONFIG", None)
TOLERANCE = 1e-4  # the bound on |Δp|
#: What the run-time commands must not load (training stack, converter, librosa's numba).
FORBIDDEN = ("tensorflow", "keras", "tf2onnx", "onnx", "librosa", "numba", "llvmlite", "musicnn")


def needs_keras():
    return pytest.importorskip("keras", reason="needs the train extra (pip install '.[train]')")


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tagger.cli", *args], capture_output=True, text=True, env=env or ENV, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"tagger {' '.join(args)} -> {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def shipped_keras():
    needs_keras()
    return load_keras(default_bundle_dir())


def real_windows(shared_png: Path, n: int = 64) -> np.ndarray:
    """Training images of the valid split, one window each, genres interleaved."""
    from tagger.dataset import read_split

    ids = read_split(shared_png / "splits" / "valid.txt")
    by_genre: dict[str, list[str]] = {}
    for i in ids:
        by_genre.setdefault(i.split("/")[0], []).append(i)
    chosen = [g[k] for k in range(n) for g in by_genre.values() if k < len(g)][:n]
    return np.stack([features.decode_png(shared_png / f"{i}.png") for i in chosen])


# --- the shipped model ----------------------------------------------------------------


def test_shipped_onnx_is_the_export_of_its_keras_model():
    """bundle.json records which model.keras the model.onnx came from; both still match."""
    from tagger.model.export import check_windows, compare

    path = default_bundle_dir()
    b = load_bundle(path)
    record = b.meta["onnx"]
    assert record["keras_sha256"] == file_sha256(path / "model.keras") == b.sha256
    assert record["sha256"] == file_sha256(path / "model.onnx")
    assert record["outputs"]["genre"] == len(b.labels)
    diffs = compare(path / "model.onnx", shipped_keras(), check_windows())
    assert diffs["max_abs_diff_genre"] <= TOLERANCE
    assert diffs["max_abs_diff_embedding"] <= TOLERANCE * max(1.0, diffs["embedding_scale"])


def test_shipped_onnx_equals_keras_on_real_windows(shared_png):
    """Probabilities within 1e-4 of Keras on real windows, and the embedding is what the heads see."""
    x = real_windows(shared_png)
    model = shipped_keras()
    onnx = load_bundle(default_bundle_dir()).model
    genre, emb = onnx.run(x)
    ref, ref_emb = (np.asarray(a) for a in model.predict_on_batch(x))
    assert float(np.abs(genre - ref).max()) <= TOLERANCE
    assert genre.argmax(1).tolist() == ref.argmax(1).tolist()
    # the embedding is the Keras model's (256 principal components of the teacher's features)
    assert emb.shape == ref_emb.shape == (len(x), 256)
    assert float(np.abs(emb - ref_emb).max()) <= TOLERANCE * max(1.0, float(np.abs(ref_emb).max()))
    # and the genre head sees exactly it: its logits (temperature folded in), plus the
    # fine-tuned tops' (averaged over the heard patches), softmaxed
    w, bias = (np.asarray(v) for v in model.get_layer("head").get_weights())
    z = emb @ w + bias
    if any(layer.name == "tops_logits" for layer in model.layers):
        import keras

        z = z + np.asarray(keras.Model(model.inputs, model.get_layer("tops_logits").output).predict_on_batch(x))
    p_head = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p_head / p_head.sum(axis=1, keepdims=True), ref, atol=1e-3)


# --- export, bundles ------------------------------------------------------------------


def test_export_of_a_two_output_model(tiny_bundle, tmp_path):
    """A model that has (genre, embedding) outputs itself is exported as it is."""
    keras = needs_keras()
    bundle = tmp_path / "two"
    shutil.copytree(tiny_bundle, bundle)
    single = load_keras(bundle)
    pooled = single.get_layer("gap").output
    embedding = keras.layers.Dense(6, name="embedding_proj")(pooled)  # any D: not the head's input
    two = keras.Model(single.inputs, [single.outputs[0], embedding], name="two_outputs")
    two.save(bundle / "model.keras")
    with pytest.raises(BundleError, match="not exported from this model.keras"):
        load_bundle(bundle)
    out = run_cli("export", str(bundle)).stdout
    assert "model.onnx" in out and "embedding 6" in out
    b = load_bundle(bundle)
    assert b.sha256 == file_sha256(bundle / "model.keras")
    x = np.random.default_rng(5).integers(0, 256, size=(7, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    genre, emb = b.model.run(x)
    ref_genre, ref_emb = (np.asarray(a) for a in two.predict_on_batch(x))
    assert emb.shape == (7, 6)
    np.testing.assert_allclose(genre, ref_genre, atol=TOLERANCE)
    np.testing.assert_allclose(emb, ref_emb, atol=TOLERANCE * max(1.0, float(np.abs(ref_emb).max())))


def _front_end_branch(weights: np.ndarray, scale: np.ndarray, shift: np.ndarray, *, also_read: bool = False):
    """``x -> Conv -> Relu -> x*scale + shift -> max over axis 3``: a musicnn front-end branch."""
    pytest.importorskip("onnx", reason="needs the train extra (pip install '.[train]')")
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["z"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["z"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["m"]),
        helper.make_node("Add", ["m", "shift"], ["a"]),
        helper.make_node("ReduceMax", ["a"], ["y"], axes=[3], keepdims=0),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if also_read:  # the batch norm's result is read elsewhere too: left as it is
        outputs.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, None))
    consts = {"w": weights, "b": np.linspace(-0.5, 0.5, len(weights)).astype(np.float32), "scale": scale, "shift": shift}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 7, 9])], outputs,
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def test_export_pools_the_front_end_first_with_the_same_result():
    """max(a*relu(z) + b) = a*relu(max z) + b for a >= 0, a*relu(-max(-z)) + b for a < 0: same bits, less work."""
    import onnxruntime as ort

    from tagger.model.export import _pool_before_affine

    rng = np.random.default_rng(3)
    weights = rng.normal(size=(5, 2, 3, 3)).astype(np.float32)
    weights[1:] = np.abs(weights[1:])  # on positive input, channels 1-4 are seldom cut by the Relu
    scale = np.array([1.5, -0.7, 0.0, -2.0, 0.3], np.float32).reshape(1, 5, 1, 1)
    shift = rng.normal(size=(1, 5, 1, 1)).astype(np.float32)
    x = rng.uniform(0.2, 1.5, size=(4, 2, 7, 9)).astype(np.float32)

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    model = _front_end_branch(weights, scale, shift)
    before = run(model)
    assert _pool_before_affine(model.graph) == 1
    assert [n.op_type for n in model.graph.node] == ["Conv", "ReduceMax", "Mul", "Relu", "Mul", "Add"]
    assert {i.name for i in model.graph.initializer}.isdisjoint({"w", "b", "scale", "shift"})  # no dead weights
    after = run(model)
    assert after.shape == before.shape == (4, 5, 7)
    np.testing.assert_array_equal(after, before)
    for channel in (0, 1, 3, 4):  # positive and negative scales: each varies, so the check means something
        assert len(np.unique(before[:, channel])) > 10

    shared = _front_end_branch(weights, scale, shift, also_read=True)
    assert _pool_before_affine(shared.graph) == 0
    assert [n.op_type for n in shared.graph.node] == ["Conv", "Relu", "Mul", "Add", "ReduceMax"]


def test_retrained_bundle_is_refused_until_exported_again(tiny_bundle, tmp_path):
    needs_keras()
    bundle = tmp_path / "retrained"
    shutil.copytree(tiny_bundle, bundle)
    before = load_bundle(bundle)
    x = np.random.default_rng(6).integers(0, 256, size=(4, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    old = before.model.run(x)[0]
    model = load_keras(before.path)
    head = model.get_layer("genre")
    w, b = head.get_weights()
    head.set_weights([w[:, ::-1], b[::-1]])  # another model: the genres swapped around
    model.save(bundle / "model.keras")
    with pytest.raises(BundleError, match="was not exported from this model.keras.*tagger export"):
        load_bundle(bundle)
    (bundle / "model.onnx").unlink()
    with pytest.raises(BundleError, match="no model.onnx beside model.keras"):
        load_bundle(bundle)
    run_cli("export", str(bundle))
    after = load_bundle(bundle)
    assert after.sha256 == file_sha256(bundle / "model.keras") != before.sha256
    new = after.model.run(x)[0]
    np.testing.assert_allclose(new, np.asarray(model.predict_on_batch(x)), atol=TOLERANCE)
    assert not np.allclose(new, old, atol=1e-3)
    # exporting the same weights again keeps the identity; an ONNX-only bundle keeps it too
    run_cli("export", str(bundle))
    assert load_bundle(bundle).sha256 == after.sha256
    (bundle / "model.keras").unlink()
    assert load_bundle(bundle).sha256 == after.sha256


def test_training_and_export_without_the_train_extra_say_how_to_install(png_layout):
    """Without Keras/TensorFlow (as after a plain ``pip install .``) the commands say what to install."""
    block = "import sys; sys.modules.update(keras=None, tensorflow=None, tf2onnx=None); from tagger.cli import main; main()"
    for args in (["train", str(png_layout)], ["export", str(default_bundle_dir())]):
        proc = subprocess.run([sys.executable, "-c", block, *args], capture_output=True, text=True, env=ENV, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        assert "train extra" in proc.stderr and "pip install '.[train]'" in proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.fixture
def png_layout(tmp_path) -> Path:
    root = tmp_path / "png"
    (root / "jazz").mkdir(parents=True)
    return root


# --- inference --------------------------------------------------------------------------


def test_classification_carries_the_mean_embedding(tiny_bundle, synth_audio, tmp_path):
    from tagger import audio

    long = synth_audio(seconds=95.0)
    bad = tmp_path / "bad.mp3"
    bad.write_text("not audio\n")
    results = classify([long, bad, synth_audio(seconds=6.0)], bundle=tiny_bundle, batch_size=2, max_windows=3, workers=1)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].embedding is None
    _, windows = audio.load_track(str(long), 3)
    model = OnnxModel(Path(tiny_bundle) / "model.onnx")
    probs, embs = model.run(windows)
    r = results[0]
    assert r.windows == 3 and r.embedding is not None
    assert r.embedding.dtype == np.float32 and r.embedding.shape == (embs.shape[1],)
    np.testing.assert_allclose(r.embedding, embs.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r.probabilities[g] for g in load_bundle(tiny_bundle).labels], probs.mean(axis=0), atol=1e-6)


def test_any_batch_size_gives_the_same_answers(tiny_bundle):
    x = np.random.default_rng(8).integers(0, 256, size=(11, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    outs = [Classifier(tiny_bundle, batch_size=n, workers=0).predict(x) for n in (1, 4, 64)]
    for p, e in outs[1:]:
        np.testing.assert_allclose(p, outs[0][0], atol=1e-6)
        np.testing.assert_allclose(e, outs[0][1], atol=1e-5)


# --- the run-time commands load no training stack ------------------------------------------


def imported(stderr: str) -> set[str]:
    """Top-level modules named by ``PYTHONPROFILEIMPORTTIME`` lines (any process of the run)."""
    names = set()
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)", line)
        if m:
            names.add(m.group(1).split(".")[0])
    return names


def test_scan_query_and_serve_never_import_tensorflow(tiny_bundle, synth_audio, tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    track = music / "a.wav"
    shutil.copyfile(synth_audio(seconds=40.0), track)
    db = tmp_path / "tagger.db"
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[library]\nfolders = ["{music}"]\n[database]\npath = "{db}"\n[model]\npath = "{tiny_bundle}"\nworkers = 1\n'
        '[tags]\nmin_confidence = 0.0\n[daemon]\nsettle_seconds = 0.5\nmax_wait = 0.5\n'
    )
    env = {**ENV, "PYTHONPROFILEIMPORTTIME": "1"}
    scan = run_cli("--config", str(cfg), "scan", "--json", str(music), env=env)
    assert json.loads(scan.stdout)["counts"].get("tagged") == 1
    seen = imported(scan.stderr)
    assert {"tagger", "onnxruntime", "soundfile"} <= seen  # the check sees the decode worker too
    query = run_cli("--config", str(cfg), "query", "--format", "json", env=env)
    assert json.loads(query.stdout)[0]["path"] == str(track)
    seen |= imported(query.stderr)

    second = music / "b.wav"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "tagger", "--config", str(cfg), "serve"], stdout=out, stderr=out, env=env, cwd=ROOT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while "ready: watching" not in log.read_text(errors="replace"):
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        shutil.copyfile(synth_audio(seconds=7.0), second)

        def tagged() -> int:
            with sqlite3.connect(db, timeout=30) as con:
                return con.execute("SELECT count(*) FROM tracks WHERE path = ? AND status = 'tagged'", (str(second),)).fetchone()[0]

        while not tagged():
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(10)
    text = log.read_text(errors="replace")
    assert "on CPU" in text or "on GPU" in text
    seen |= imported(text)
    assert not seen & set(FORBIDDEN), f"run-time commands imported {sorted(seen & set(FORBIDDEN))}"
