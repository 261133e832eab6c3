"""Make the reference fixture for our Keras port of musicnn's pretrained MSD_musicnn tagger.

Why: tagger re-implements the `MSD_musicnn` network of the `musicnn` wheel (PyPI musicnn==0.1.0,
ISC licence, Jordi Pons / MTG-UPF, http://github.com/jordipons/musicnn) in Keras 3. A test must
prove the port equal to musicnn's own code, so this script runs musicnn's original TF1-style code
ONCE on two real GTZAN clips and stores what it computed in tests/data/musicnn_reference.npz
(+ .json metadata). The test only reads those files; it never needs musicnn or TF 2.15.

Environment: NOT the project's venv. musicnn 0.1.0 pins numpy<1.17 in its metadata, so it lives in
a throwaway venv outside the repo where pip never resolves its dependencies:

    python3 -m venv /tmp/mnref-venv
    /tmp/mnref-venv/bin/pip install 'tensorflow-cpu==2.15.*' 'numpy==1.26.*' 'librosa==0.10.*' soundfile
    /tmp/mnref-venv/bin/pip install --no-deps musicnn==0.1.0

Command (from the repository root, with ../shared holding the GTZAN clips):

    /tmp/mnref-venv/bin/python scripts/musicnn_reference.py

What is stored per clip (key prefix = clip id, e.g. "blues.00000/"):
- input:       musicnn.extractor.batch_data(path, 187, 187)[0], the log-mel patches exactly as
               musicnn feeds them to the network, float32, shape (patches, 187, 96). NOT float16:
               musicnn rounds the mel power to float16, but `10000 * audio_rep` promotes to float32
               under NumPy 1.x value-based casting (10000 -> uint16; uint16 * float16 -> float32),
               so the log is taken in float32: input == log10(10000 * mel.astype(float16)
               .astype(float32) + 1), checked bit-exactly below. Under NumPy 2 (NEP 50) the same
               line stays float16 and overflows to inf for mel power > 6.55: a port must cast first.
- taggram:     sigmoid tag probabilities per patch, (patches, 50), columns in `labels` order.
- mean_pool, max_pool: temporal mean / max of the 753 mid-end features per patch, (patches, 753).
- penultimate: the 200-unit dense layer after its batch norm, per patch, (patches, 200).
taggram/mean_pool/max_pool come from musicnn.extractor.extractor(path, model='MSD_musicnn',
input_length=3, input_overlap=False, extract_features=True), which runs the patches one at a time
(configuration.BATCH_SIZE = 1) and concatenates these three over ALL patches. Its `penultimate`
(and cnn1/cnn2/cnn3) are wrong after the first patch: the loop unpacks into `backend_` (`midend*_`)
but appends `penultimate_` (`cnn*_`), the first patch's arrays, so every row repeats patch 0. So
the script also builds musicnn's graph itself, as extractor() does (models.define_model inside
tf.name_scope('model'), Saver.restore of the wheel's checkpoint, is_training=False), runs the whole
batch at once, and takes `penultimate` from that run. It checks that run's taggram/mean_pool/
max_pool and patch 0's penultimate against extractor() (largest differences go in the .json).
Its restore is strict: extractor() swallows a failed restore with a bare `except:` and would
silently run random weights for MSD_musicnn.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import warnings
from pathlib import Path

import librosa
import numpy as np
import tensorflow as tf
from musicnn import configuration as config
from musicnn import extractor, models

warnings.filterwarnings("ignore", category=UserWarning, module="musicnn")  # tf.layers deprecations

MODEL = "MSD_musicnn"
INPUT_LENGTH_S = 3
CLIPS = (
    "data/gtzan-audio-mini/blues/blues.00000.flac",
    "data/gtzan-audio-mini/classical/classical.00001.flac",
)
FEATURES = ("mean_pool", "max_pool", "penultimate")
MAX_BYTES = 2_000_000
KEEP_IF_TOO_BIG = 5
REPO = Path(__file__).resolve().parent.parent


def frames() -> tuple[int, int]:
    """n_frames and overlap exactly as extractor.extractor computes them (input_overlap=False)."""
    n_frames = (
        librosa.time_to_frames(
            INPUT_LENGTH_S, sr=config.SR, n_fft=config.FFT_SIZE, hop_length=config.FFT_HOP
        )
        + 1
    )
    return int(n_frames), int(n_frames)


def float16_rounded_log_mel(path: Path) -> np.ndarray:
    """musicnn's log-mel written out with its dtypes explicit, to prove where float16 applies."""
    audio, sr = librosa.load(str(path), sr=config.SR)
    mel = librosa.feature.melspectrogram(
        y=audio, sr=sr, hop_length=config.FFT_HOP, n_fft=config.FFT_SIZE, n_mels=config.N_MELS
    ).T
    return np.log10(np.float32(10000) * mel.astype(np.float16).astype(np.float32) + np.float32(1))


def whole_batch(batch: np.ndarray) -> dict[str, np.ndarray]:
    """Run musicnn's own graph on all patches at once, with a restore that fails loudly."""
    n_frames = batch.shape[1]
    tf.compat.v1.reset_default_graph()
    with tf.name_scope("model"):
        x = tf.compat.v1.placeholder(tf.float32, [None, n_frames, config.N_MELS])
        is_training = tf.compat.v1.placeholder(tf.bool)
        y, _, _, _, _, _, mean_pool, max_pool, penultimate = models.define_model(
            x, is_training, MODEL, len(config.MSD_LABELS)
        )
        normalized_y = tf.nn.sigmoid(y)
    with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        saver = tf.compat.v1.train.Saver()
        saver.restore(sess, os.path.dirname(extractor.__file__) + "/" + MODEL + "/")
        out = sess.run(
            [normalized_y, mean_pool, max_pool, penultimate],
            feed_dict={x: batch, is_training: False},
        )
    return dict(zip(("taggram", *FEATURES), out, strict=True))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data")
    args = parser.parse_args()

    n_frames, overlap = frames()
    labels = list(config.MSD_LABELS)
    arrays: dict[str, np.ndarray] = {"labels": np.array(labels)}
    clips_meta = []
    for rel in CLIPS:
        path = args.shared / rel
        clip = path.name.removesuffix(".flac")
        batch, spectrogram = extractor.batch_data(str(path), n_frames, overlap)
        if batch.dtype != np.float32 or not np.isfinite(batch).all():
            raise SystemExit(
                f"{rel}: unexpected input batch {batch.dtype}, finite={np.isfinite(batch).all()}"
            )
        if not np.array_equal(spectrogram, float16_rounded_log_mel(path)):
            raise SystemExit(f"{rel}: musicnn's log-mel is not log10(10000 * f16(mel) in f32 + 1)")
        taggram, tags, features = extractor.extractor(
            str(path),
            model=MODEL,
            input_length=INPUT_LENGTH_S,
            input_overlap=False,
            extract_features=True,
        )
        assert list(tags) == labels
        ref = {"taggram": np.asarray(taggram, np.float32)}
        ref.update({k: np.asarray(features[k], np.float32) for k in FEATURES})
        for key, value in ref.items():
            assert value.shape[0] == batch.shape[0], (key, value.shape, batch.shape)
        own = whole_batch(batch)
        diffs = {
            k: float(np.max(np.abs(own[k] - ref[k]))) for k in ("taggram", "mean_pool", "max_pool")
        }
        diffs["penultimate_patch0"] = float(
            np.max(np.abs(own["penultimate"][0] - ref["penultimate"][0]))
        )
        if max(diffs.values()) > 1e-4:
            raise SystemExit(f"{clip}: whole-batch run disagrees with extractor(): {diffs}")
        ref["penultimate"] = own["penultimate"]  # extractor() repeats patch 0 (see docstring)
        top = np.argsort(-ref["taggram"].mean(axis=0))[:5]
        top5 = [[labels[i], round(float(ref["taggram"][:, i].mean()), 4)] for i in top]
        print(f"{clip}: {batch.shape[0]} patches; top-5 tags by mean over patches: {top5}")
        print(f"{clip}: max |whole batch - extractor| = {diffs}")
        arrays[f"{clip}/input"] = batch
        arrays.update({f"{clip}/{k}": v for k, v in ref.items()})
        clips_meta.append(
            {
                "id": clip,
                "path_in_shared": rel,
                "sha256": sha256(path),
                "spectrogram_frames": int(spectrogram.shape[0]),
                "patches": int(batch.shape[0]),
                "patches_kept": int(batch.shape[0]),
                "top5_mean_over_patches": top5,
                "max_abs_diff_whole_batch_vs_extractor": diffs,
                "extractor_penultimate_rows_all_equal_patch0": bool(
                    (np.asarray(features["penultimate"]) == features["penultimate"][0]).all()
                ),
            }
        )

    args.out.mkdir(parents=True, exist_ok=True)
    npz = args.out / "musicnn_reference.npz"
    np.savez_compressed(npz, **arrays)
    truncated = npz.stat().st_size > MAX_BYTES
    if truncated:
        arrays = {k: (v if k == "labels" else v[:KEEP_IF_TOO_BIG]) for k, v in arrays.items()}
        for meta in clips_meta:
            meta["patches_kept"] = min(meta["patches"], KEEP_IF_TOO_BIG)
        np.savez_compressed(npz, **arrays)

    versions = {
        name: importlib.metadata.version(name)
        for name in ("musicnn", "numpy", "librosa", "soundfile", "soxr", "scipy")
    }
    versions["tensorflow"] = tf.__version__
    versions["python"] = platform.python_version()
    meta = {
        "what": "Outputs of musicnn's own code for its pretrained MSD_musicnn tagger on real GTZAN clips",
        "made_by": "scripts/musicnn_reference.py",
        "command": "/tmp/mnref-venv/bin/python scripts/musicnn_reference.py",
        "environment": "separate venv: tensorflow-cpu 2.15, numpy 1.26, librosa 0.10, soundfile, "
        "musicnn==0.1.0 installed with --no-deps",
        "versions": versions,
        "model": MODEL,
        "extractor_call": f"extractor.extractor(path, model='{MODEL}', input_length={INPUT_LENGTH_S}, "
        "input_overlap=False, extract_features=True)",
        "input_call": f"extractor.batch_data(path, {n_frames}, {overlap})[0]",
        "sources": {
            "taggram, mean_pool, max_pool": "extractor_call (patch by patch, BATCH_SIZE 1)",
            "penultimate": "musicnn's graph (models.define_model + Saver.restore, is_training=False) "
            "on the whole input batch at once; extractor() repeats patch 0's penultimate",
            "input": "input_call",
        },
        "musicnn_config": {
            "SR": config.SR,
            "FFT_HOP": config.FFT_HOP,
            "FFT_SIZE": config.FFT_SIZE,
            "N_MELS": config.N_MELS,
            "BATCH_SIZE": config.BATCH_SIZE,
            "n_frames": n_frames,
            "overlap": overlap,
        },
        "preprocessing": "librosa.load(path, sr=16000) (librosa default res_type soxr_hq); "
        "melspectrogram(hop_length=256, n_fft=512, n_mels=96).T; astype(float16); "
        "log10(10000 * x + 1) computed in float32 (NumPy 1.x promotion; bit-exact check done); "
        "non-overlapping 187-frame patches, the tail shorter than a patch dropped",
        "truncated_to_first_patches": KEEP_IF_TOO_BIG if truncated else None,
        "keys": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
        "labels": labels,
        "clips": clips_meta,
        "licence": "musicnn: ISC, Copyright (c) Music Technology Group, Universitat Pompeu Fabra "
        "2019. Code developed by Jordi Pons (www.jordipons.me). http://github.com/jordipons/musicnn",
    }
    (args.out / "musicnn_reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {npz} ({npz.stat().st_size} bytes){' truncated' if truncated else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
