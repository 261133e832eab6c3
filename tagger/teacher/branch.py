"""The genre model with a frozen pretrained branch: musicnn behind the bridge.

Route chosen for the shipped model (see docs/model.md): the teacher's own
front-end, mid-end and back-end (musicnn, pretrained on ~200 k songs, frozen)
hear each window through the bridge; their per-patch pooled features (mean and
max over time of 753 features per frame) are pooled again over the window's
patches (mean and max: 3,012 features), standardised, projected on their
principal components (the embedding the database keeps) and classified by a
linear softmax head fitted on the training windows. A DenseNet trained by
``tagger train`` may sit beside it: its probabilities and the head's are pooled
log-linearly (``LogLinearPool``) with a weight fixed before training.

Training-side only: builds Keras models (TensorFlow); the bundle it writes is
exported to ONNX for scan and serve.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from .. import features
from . import bridge as br

#: Teacher features per window: mean and max over patches of [mean_pool, max_pool].
WINDOW_FEATURES = 4 * 753


@dataclass
class HeadConfig:
    """Everything that decides the head; saved in the bundle."""

    patches: int = 5
    embedding_dim: int = 256
    c: float = 0.02
    densenet_weight: float = 0.0
    log10_gain: float = br.DEFAULT_LOG10_GAIN
    extra: dict = field(default_factory=dict)
    #: Mixed data (``--labelled``): L2 strength of the label-set head, the temperature its
    #: logits are divided by (fitted on held-out folds) and the folds' seed.
    l2: float = 0.1
    temperature: float = 1.0
    seed: int = 0
    #: Fine-tuned musicnn tops beside the linear head (:mod:`tagger.teacher.top`): their
    #: settings (empty: none), their share of the pooled logits, and the temperatures each
    #: branch's held-out logits were divided by before pooling.
    top: dict = field(default_factory=dict)
    top_weight: float = 0.0
    linear_temperature: float = 1.0
    top_temperature: float = 1.0
    #: The linear head also reads the window's mel statistics (:mod:`tagger.teacher.melstats`).
    mel_stats: bool = False
    #: ... the standard deviation of musicnn's features over the patches (beside their mean and max),
    #: and the correlations of the band groups' levels (:class:`tagger.teacher.melstats.BandCorrelation`).
    patch_std: bool = False
    band_corr: bool = False
    #: How far the calibrated logits are shifted toward balanced genres: each genre's logit
    #: less ``prior_shift`` times the log of its mean held-out probability (0: none). The
    #: training mix is an accident of the data at hand (Emotify's 130 pop windows, say), not
    #: a library's; ``prior_bias`` is the shift fitted, folded into the exported graph.
    prior_shift: float = 0.0
    prior_bias: list | None = None

    def to_dict(self) -> dict:
        keys = ("patches", "embedding_dim", "c", "densenet_weight", "log10_gain", "extra", "l2", "temperature", "seed", "top", "top_weight", "linear_temperature", "top_temperature", "mel_stats", "patch_std", "band_corr", "prior_shift", "prior_bias")
        return {k: getattr(self, k) for k in keys}


def window_features(mean_pool: np.ndarray, max_pool: np.ndarray, patches: int) -> np.ndarray:
    """Per-patch outputs ``(N, 10, 753)`` → the branch's features ``(N, 3012)`` for ``patches`` patches.

    Mirrors the Keras graph exactly: per patch ``[mean_pool, max_pool]``, then
    the mean and the max of those over the chosen (evenly spread) patches.
    """
    return _pooled(_per_patch(mean_pool, max_pool, patches))


def _pooled(per: np.ndarray, std: bool = False) -> np.ndarray:
    """Per-patch features ``(N, P, D)`` → their mean and max over the patches (and their standard deviation)."""
    return np.concatenate([per.mean(axis=1), per.max(axis=1)] + ([per.std(axis=1)] if std else []), axis=-1)


def _per_patch(mean_pool: np.ndarray, max_pool: np.ndarray, patches: int) -> np.ndarray:
    """``(N, patches, 1506)``: each chosen patch's ``[mean_pool, max_pool]``, as the graph's ``patch_pools``."""
    from .musicnn import Bridge

    idx = Bridge.patch_indices(patches)
    return np.concatenate([mean_pool[:, idx], max_pool[:, idx]], axis=-1).astype(np.float32)


def head_features(mean_pool: np.ndarray, max_pool: np.ndarray, levels: np.ndarray, cfg: HeadConfig) -> np.ndarray:
    """What the linear head reads, in the exported graph's order: :func:`window_features`, then
    (each when ``cfg`` asks) the per-patch features' standard deviation over the patches, the
    windows' mel statistics and their band groups' correlations."""
    f = [_pooled(_per_patch(mean_pool, max_pool, cfg.patches), cfg.patch_std)]
    if cfg.mel_stats:
        from .melstats import mel_stats

        f.append(mel_stats(levels))
    if cfg.band_corr:
        from .melstats import band_correlation

        f.append(band_correlation(levels))
    return np.concatenate(f, axis=-1)


#: What the teacher cache keeps of every patch: the branch's features and the distillation targets.
PATCH_OUTPUTS = ("mean_pool", "max_pool", "tags", "penultimate")


class PatchCache:
    """The teacher's per-patch outputs for windows, computed once and kept on disk.

    Keyed by the window's bytes and the bridge gain, so the same window is never
    run through the teacher twice, whatever the split, the crop or the route
    (the frozen branch reads the pools, distillation the tags and penultimate).
    """

    def __init__(self, cache_dir: Path | None, log10_gain: float = br.DEFAULT_LOG10_GAIN):
        self.dir = Path(cache_dir) if cache_dir else None
        self.log10_gain = float(log10_gain)
        self._net = None

    def _key(self, window: np.ndarray) -> str:
        h = hashlib.sha256(np.ascontiguousarray(window).tobytes())
        h.update(f"musicnn|{self.log10_gain:.6f}|{features.REPRESENTATION_VERSION}".encode())
        return h.hexdigest()[:32]

    def _model(self):
        if self._net is None:
            import keras

            from .checkpoint import load_musicnn
            from .musicnn import Bridge

            musicnn = load_musicnn()
            inp = keras.Input((features.N_MELS, features.N_COLUMNS), dtype="uint8")
            b = Bridge(self.log10_gain, br.PATCHES_PER_WINDOW)
            x = b(inp)
            b.set_matrices()
            out = musicnn(x)
            self._net = keras.Model(inp, [out[k] for k in PATCH_OUTPUTS])
        return self._net

    def outputs(
        self,
        x: np.ndarray,
        progress: Callable[[int, int], None] | None = None,
        batch: int = 8,
        names: tuple[str, ...] = ("mean_pool", "max_pool"),
    ) -> tuple[np.ndarray, ...]:
        """``(N, 10, D)`` per-patch outputs ``names`` (of ``PATCH_OUTPUTS``) of every window of ``x``."""
        n = len(x)
        dims = dict(zip(PATCH_OUTPUTS, (753, 753, 50, 200), strict=True))
        out = {k: np.zeros((n, br.PATCHES_PER_WINDOW, dims[k]), np.float16) for k in names}
        keys = [self._key(w) for w in x]
        todo = []
        for i, k in enumerate(keys):
            f = self.dir / f"{k}.npz" if self.dir else None
            if f is not None and f.exists():
                with np.load(f) as z:
                    if all(name in z.files for name in names):
                        for name in names:
                            out[name][i] = z[name]
                        continue
            todo.append(i)
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
        for s in range(0, len(todo), batch):
            idx = todo[s : s + batch]
            got = [np.asarray(a).reshape(len(idx), br.PATCHES_PER_WINDOW, -1) for a in self._model().predict_on_batch(x[idx])]
            for j, i in enumerate(idx):
                per = {name: a[j].astype(np.float16) for name, a in zip(PATCH_OUTPUTS, got, strict=True)}
                for name in names:
                    out[name][i] = per[name]
                if self.dir:
                    tmp = self.dir / f".{keys[i]}.{os.getpid()}.tmp.npz"
                    np.savez(tmp, **per)
                    os.replace(tmp, self.dir / f"{keys[i]}.npz")
            if progress:
                progress(min(s + batch, len(todo)), len(todo))
        return tuple(out[name] for name in names)


@dataclass
class Head:
    """Standardisation, principal components and the linear softmax head, as arrays."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray  # (dim, 3012)
    pca_mean: np.ndarray
    coef: np.ndarray  # (n_classes, dim)
    intercept: np.ndarray

    def embed(self, f: np.ndarray) -> np.ndarray:
        return ((f - self.mean) / self.scale - self.pca_mean) @ self.components.T

    def logits(self, f: np.ndarray) -> np.ndarray:
        return self.embed(f) @ self.coef.T + self.intercept


def fit_head(f: np.ndarray, y: np.ndarray, n_classes: int, cfg: HeadConfig) -> Head:
    """Standardise, project on ``embedding_dim`` principal components, fit a multinomial logistic regression."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(f)
    z = sc.transform(f)
    dim = min(cfg.embedding_dim, z.shape[0] - 1, z.shape[1])
    pca = PCA(n_components=dim, random_state=0).fit(z)
    e = pca.transform(z)
    lr = LogisticRegression(C=cfg.c, max_iter=5000).fit(e, y)
    coef = np.zeros((n_classes, dim), np.float64)
    intercept = np.full(n_classes, -30.0)  # a genre absent from training is never chosen
    coef[lr.classes_] = lr.coef_ if len(lr.classes_) > 2 else np.vstack([-lr.coef_, lr.coef_])
    intercept[lr.classes_] = lr.intercept_ if len(lr.classes_) > 2 else np.array([-lr.intercept_[0], lr.intercept_[0]])
    return Head(sc.mean_, sc.scale_, pca.components_, pca.mean_, coef, intercept)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def fuse(teacher_logits: np.ndarray, densenet_probs: np.ndarray | None, weight: float) -> np.ndarray:
    """The shipped pooling of the two branches, in numpy (``LogLinearPool`` in Keras)."""
    if densenet_probs is None or weight <= 0:
        return softmax(teacher_logits)
    p = softmax(teacher_logits)
    return softmax((1 - weight) * np.log(p + 1e-7) + weight * np.log(densenet_probs + 1e-7))


@keras.saving.register_keras_serializable(package="tagger")
class LogLinearPool(layers.Layer):
    """``softmax((1 − w)·log softmax(logits) + w·log p)``: the head's and the DenseNet's genres, pooled."""

    def __init__(self, weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.weight = float(weight)

    def call(self, inputs):
        logits, probs = inputs
        logp = ops.log(ops.softmax(logits, axis=-1) + 1e-7)
        return ops.softmax((1.0 - self.weight) * logp + self.weight * ops.log(probs + 1e-7), axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}


def build_branch_model(musicnn, head: Head, cfg: HeadConfig, n_classes: int, densenet=None, tops=None):
    """The shipped Keras model: ``levels`` → outputs ``genre`` (probabilities) and ``embedding``.

    ``tops`` (fine-tuned musicnn tops, :class:`tagger.teacher.top.Top`, their pooling
    weights and temperatures already folded into their last layer) add their logits,
    averaged over the window's patches, to the linear head's.
    """
    from .musicnn import Bridge, PatchPool

    inputs = keras.Input((features.N_MELS, features.N_COLUMNS), dtype="uint8", name="levels")
    b = Bridge(cfg.log10_gain, cfg.patches, name="bridge")
    x = b(inputs)
    b.set_matrices()
    musicnn.trainable = False
    out = musicnn(x)
    per_patch = layers.Concatenate(axis=-1, name="patch_pools")([out["mean_pool"], out["max_pool"]])
    f = PatchPool(cfg.patches, name="teacher_features")(per_patch)
    parts = [f]
    if cfg.patch_std:
        parts.append(PatchPool(cfg.patches, "std", name="patch_std")(per_patch))
    if cfg.mel_stats:
        from .melstats import MelStats

        parts.append(MelStats(name="mel_stats")(inputs))
    if cfg.band_corr:
        from .melstats import BandCorrelation

        parts.append(BandCorrelation(name="band_corr")(inputs))
    if len(parts) > 1:
        f = layers.Concatenate(axis=-1, name="head_features")(parts)
    dim = head.components.shape[0]
    # standardise + principal components as one affine map: the embedding
    proj = layers.Dense(dim, name="embedding")
    emb = proj(f)
    kernel = (head.components / head.scale[None, :]).T
    bias = -((head.mean / head.scale + head.pca_mean) @ head.components.T)
    proj.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    dense = layers.Dense(n_classes, name="head")
    logits = dense(emb)
    dense.set_weights([head.coef.T.astype(np.float32), head.intercept.astype(np.float32)])
    if tops:
        logits = layers.Add(name="pooled_logits")([logits, _tops_graph(out, tops, cfg.patches)])
    if densenet is not None and cfg.densenet_weight > 0:
        densenet.trainable = False
        genre = LogLinearPool(cfg.densenet_weight, name="genre")([logits, densenet(inputs)])
    else:
        genre = layers.Softmax(name="genre")(logits)
    model = keras.Model(inputs, [genre, emb], name="musicnn_branch")
    model.trainable = False
    return model


def _tops_graph(out, tops, patches: int):
    """musicnn's per-patch pools → the tops' summed logits, averaged over each window's patches."""
    from .musicnn import FRAME_FEATURES, PatchPool
    from .top import BN_EPSILON

    cols = [layers.Reshape((FRAME_FEATURES, 1), name=f"top_{n}_col")(out[n]) for n in ("max_pool", "mean_pool")]
    x = layers.Flatten(name="top_input")(layers.Concatenate(axis=-1, name="top_pairs")(cols))  # (N·P, 1506)
    per = []
    for i, t in enumerate(tops):
        bn0 = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"top{i}_pool_bn")
        d1 = layers.Dense(200, activation="relu", name=f"top{i}_penultimate")
        bn1 = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"top{i}_penultimate_bn")
        d2 = layers.Dense(t.head[0].shape[1], name=f"top{i}_genres")
        per.append(d2(bn1(d1(bn0(x)))))
        for layer, w in ((bn0, t.pool_bn), (d1, t.dense), (bn1, t.dense_bn), (d2, t.head)):
            layer.set_weights([np.asarray(v, np.float32) for v in w])
    z = per[0] if len(per) == 1 else layers.Add(name="tops_sum")(per)
    return PatchPool(patches, "mean", name="tops_logits")(z)


def run_branch_training(
    train,
    valid,
    cfg: HeadConfig,
    out_dir: Path,
    *,
    name: str,
    data_summary: dict,
    cache_dir: Path | None,
    densenet_bundle: Path | None = None,
    progress: Callable[[str], None] | None = None,
):
    """Fit the head on the teacher's features of ``train``, build, evaluate on ``valid``, save the bundle."""
    from ..model.bundle import load_bundle
    from ..model.evaluate import plot_confusion, report_from
    from ..model.export import load_keras, save_bundle
    from .checkpoint import checkpoint_prefix, load_musicnn

    say = progress or (lambda s: None)
    t0 = time.time()
    cache = PatchCache(cache_dir, cfg.log10_gain)
    say(f"teacher features of {len(train.x)} training windows (cached in {cache_dir})")
    mean, mx = cache.outputs(train.x, progress=lambda i, n: say(f"  {i}/{n}") if i % 64 == 0 or i == n else None)
    f_train = window_features(mean, mx, cfg.patches)
    head = fit_head(f_train, train.y, len(train.labels), cfg)
    densenet = None
    if densenet_bundle is not None:
        db = load_bundle(densenet_bundle)
        if db.labels != list(train.labels):
            raise ValueError(f"{densenet_bundle}: its labels {db.labels} differ from the data's {train.labels}")
        densenet = load_keras(db.path)
    model = build_branch_model(load_musicnn(), head, cfg, len(train.labels), densenet)
    seconds = time.time() - t0
    metrics: dict = {}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if valid is not None:
        say(f"evaluating on {len(valid.x)} validation windows")
        probs = np.concatenate([np.asarray(model.predict_on_batch(valid.x[i : i + 16])[0]) for i in range(0, len(valid.x), 16)])
        report = report_from(probs, valid, train.labels)
        metrics["valid"] = report.to_json()
        plot_confusion(report, Path(out_dir) / "confusion.png", title=f"valid accuracy {report.accuracy:.1%} (n={report.n})")
    training = {
        "data": data_summary,
        "route": "frozen musicnn branch + linear head" + (" + DenseNet" if densenet is not None and cfg.densenet_weight > 0 else ""),
        "head": cfg.to_dict(),
        "teacher": {
            "model": "MSD_musicnn (musicnn 0.1.0, ISC licence, Music Technology Group, Universitat Pompeu Fabra)",
            "checkpoint": str(checkpoint_prefix().name),
        },
        "densenet": {"name": db.name, "sha256": db.sha256} if densenet is not None else None,  # never a path of this machine
        "seconds": round(seconds, 1),
        "parameters": int(model.count_params()),
    }
    # On the CPU one window (``patches`` teacher patches) per ONNX Runtime call: the
    # session keeps memory for its largest call (about 100 MB a window here).
    bundle = save_bundle(out_dir, model, train.labels, name=name, training=training, metrics=metrics, extra={"embedding_dim": int(head.components.shape[0]), "runtime": {"cpu_chunk": 1}})
    return bundle, metrics
