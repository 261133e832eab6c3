"""A learnt head: the owner's genres, predicted from a base model's embedding.

``tagger learn`` fits a small linear model (standardised embedding → softmax over the
owner's labels) on the embeddings stored for tracks whose genre a person set, and saves
it as a *head bundle*: ``head.npz`` (plain arrays: mean, scale, weights, bias) and
``head.json`` (its labels, the base model it was learnt on, by sha256, metrics). Applying
it is one matrix product in numpy, so neither learning nor scanning with a head needs
TensorFlow beyond what the base model itself needs.

A head is used wherever a bundle is (``tagger scan --model DIR``, ``[model] path``, the
daemon): :func:`load_any` returns a :class:`HeadBundle`, :func:`make_classifier` a
:class:`HeadClassifier` that runs the base model as usual and maps each track's
embedding to the owner's genres. A head whose base model is not the installed one is
refused: its weights mean nothing for another model's features.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import META_FILE, MODEL_FILE, Bundle, BundleError, default_bundle_dir, load_bundle
from .infer import Classification, Classifier

HEAD_META = "head.json"
HEAD_WEIGHTS = "head.npz"
KIND = "tagger-head"
VERSION = 1


class HeadError(BundleError):
    """The head bundle is unreadable, or made for another base model."""


@dataclass(frozen=True)
class Head:
    """Standardise, then a linear layer and softmax: ``softmax(((x - mean) / scale) @ weights.T + bias)``."""

    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    weights: np.ndarray  # (k, d)
    bias: np.ndarray  # (k,)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if x.shape[1] != self.dim:
            raise HeadError(f"embedding of {x.shape[1]} values, the head expects {self.dim}")
        z = (x - self.mean) / self.scale
        # One track at a time (a scan): einsum, since waking OpenBLAS's threads for so small
        # a product costs milliseconds on a busy machine; many at once: BLAS.
        wz = np.einsum("ij,kj->ik", z, self.weights) if len(z) < 64 else z @ self.weights.T
        return wz + self.bias

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """One row of label probabilities per embedding row."""
        z = self.logits(x)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "weights": self.weights, "bias": self.bias}


def fit_head(x: np.ndarray, y: np.ndarray, n_labels: int, *, c: float = 1.0, seed: int = 0) -> Head:
    """Fit the head on embeddings ``x`` and label indices ``y`` (scikit-learn, seconds).

    Multinomial logistic regression with balanced class weights (a library holds far
    more Rock than Bossa Nova; unweighted, the rare labels would never be chosen).
    Labels absent from ``y`` (a validation fold without them) get probability 0.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    # One scale for every feature, not one per feature: an embedding's features differ in
    # how much they vary for a reason (principal components, in the shipped model: the
    # last ones are mostly noise), and a few dozen tracks cannot tell which of 256 unit-
    # variance features matter; per-feature scaling let the head fit that noise (8 % right
    # on the end-to-end check, against 75 % with one scale).
    spread = float(np.sqrt(np.mean(x.var(axis=0))))
    scale = np.full(x.shape[1], spread if spread > 1e-6 else 1.0)
    z = (x - mean) / scale
    present = np.unique(y)
    weights = np.zeros((n_labels, x.shape[1]))
    bias = np.full(n_labels, -1e4)  # labels never seen: never chosen
    if len(present) == 1:
        bias[present[0]] = 0.0
    else:
        model = LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed)
        model.fit(z, y)
        coef, icpt = model.coef_, model.intercept_
        if len(present) == 2:  # scikit-learn keeps one row for two classes: split it symmetrically
            coef = np.vstack([-coef[0] / 2, coef[0] / 2])
            icpt = np.array([-icpt[0] / 2, icpt[0] / 2])
        weights[model.classes_] = coef
        bias[model.classes_] = icpt
    f32 = np.float32
    return Head(mean.astype(f32), scale.astype(f32), weights.astype(f32), bias.astype(f32))


@dataclass
class HeadBundle:
    """A saved head plus the base bundle it runs on (checked by sha256)."""

    path: Path
    labels: list[str]
    meta: dict[str, Any]
    sha256: str
    head: Head
    base: Bundle = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        return self.head.probabilities(embeddings)


def is_head(path: str | Path) -> bool:
    return (Path(path) / HEAD_META).is_file()


def _identity(weights: bytes, labels: list[str], base_sha: str) -> str:
    """The head's id in the ``models`` table: its arrays, its labels and its base, hashed."""
    h = hashlib.sha256(weights)
    h.update(json.dumps(labels, ensure_ascii=False).encode())
    h.update(base_sha.encode())
    return h.hexdigest()


def _installed_base(recorded: Mapping[str, Any], installed: Bundle | None) -> Bundle:
    """The bundle the head runs on: ``installed`` if given, else the bundle at the recorded
    path if it still has the recorded sha256, else the model shipped with tagger."""
    if installed is not None:
        return installed
    where = recorded.get("path")
    if where and Path(where, META_FILE).is_file():
        try:
            b = load_bundle(where)
            if b.sha256 == recorded.get("sha256"):
                return b
        except BundleError:
            pass
    return load_bundle(default_bundle_dir())


def load_head(path: str | Path, installed: Bundle | None = None) -> HeadBundle:
    """Read a head bundle and the base it needs; refuse one learnt on another base model."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    try:
        meta = json.loads((path / HEAD_META).read_text())
        raw = (path / HEAD_WEIGHTS).read_bytes()
    except (OSError, ValueError) as exc:
        raise HeadError(f"{path}: not a readable head bundle ({exc})") from exc
    if meta.get("kind") != KIND or meta.get("version") != VERSION:
        raise HeadError(f"{path}: head bundle of kind {meta.get('kind')!r} version {meta.get('version')!r}, this tagger reads {KIND!r} version {VERSION}")
    labels = meta.get("labels")
    recorded = meta.get("base") or {}
    if not isinstance(labels, list) or len(labels) < 2 or not recorded.get("sha256"):
        raise HeadError(f"{path}/{HEAD_META}: needs its labels and its base model's sha256")
    try:
        import io

        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            head = Head(*(np.asarray(z[k], dtype=np.float32) for k in ("mean", "scale", "weights", "bias")))
    except (OSError, ValueError, KeyError) as exc:
        raise HeadError(f"{path}/{HEAD_WEIGHTS}: unreadable ({exc})") from exc
    if head.weights.shape != (len(labels), head.dim) or head.bias.shape != (len(labels),) or head.scale.shape != (head.dim,):
        raise HeadError(f"{path}/{HEAD_WEIGHTS}: arrays do not match its {len(labels)} labels")
    base = _installed_base(recorded, installed)
    if base.sha256 != recorded["sha256"]:
        raise HeadError(
            f"{path}: these genres were learnt on the model {recorded.get('name', '?')} "
            f"(sha256 {recorded['sha256'][:12]}), the installed model is {base.name} "
            f"(sha256 {base.sha256[:12]}): its embeddings differ, so re-run `tagger learn`"
        )
    labels = [str(x) for x in labels]
    return HeadBundle(path, labels, meta, _identity(raw, labels, recorded["sha256"]), head, base)


def load_any(path: str | Path | None = None) -> Bundle | HeadBundle:
    """A model bundle or a head bundle, whichever ``path`` holds (None: the shipped model)."""
    if path and is_head(path):
        return load_head(path)
    return load_bundle(path)


def installed_base(path: str | Path | None = None) -> Bundle:
    """The model bundle whose embeddings are stored, for the bundle at ``path`` (None: the
    shipped model): the bundle itself, or for a head the base it would run on now, whether
    or not that is the one it was learnt on (``tagger learn`` is how to fix a mismatch)."""
    if path and is_head(path):
        try:
            recorded = json.loads((Path(path) / HEAD_META).read_text()).get("base") or {}
        except (OSError, ValueError) as exc:
            raise HeadError(f"{path}: not a readable head bundle ({exc})") from exc
        return _installed_base(recorded, None)
    return load_bundle(path)


def base_of(bundle: Bundle | HeadBundle) -> Bundle:
    """The bundle whose embeddings a bundle uses (itself, for a plain model)."""
    return bundle.base if isinstance(bundle, HeadBundle) else bundle


def written_names(bundle: Bundle | HeadBundle, names: Mapping[str, str]) -> dict[str, str]:
    """``[tags.names]`` for this bundle: a head's labels are the owner's own names, written
    exactly as learnt (``[learn.aliases]`` renames them), whatever the table says."""
    if isinstance(bundle, HeadBundle):
        return {**names, **{label: label for label in bundle.labels}}
    return dict(names)


def save_head(
    out_dir: str | Path,
    head: Head,
    labels: list[str],
    base: Bundle,
    *,
    name: str,
    training: dict[str, Any],
    metrics: dict[str, Any],
) -> HeadBundle:
    """Write ``head.npz`` then ``head.json`` (the file that makes the folder a head bundle)."""
    out = Path(out_dir)
    if (out / MODEL_FILE).exists():
        raise HeadError(f"{out} holds a model bundle ({MODEL_FILE}); choose another --out folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{HEAD_WEIGHTS}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **head.arrays())
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out / HEAD_WEIGHTS)
    meta = {
        "kind": KIND,
        "version": VERSION,
        "name": name,
        "labels": list(labels),
        "base": {"sha256": base.sha256, "name": base.name, "path": str(base.path)},
        "embedding_dim": head.dim,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "training": training,
        "metrics": metrics,
    }
    tmp = out / f".{HEAD_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(out / HEAD_META)
    return load_head(out, installed=base)


class HeadClassifier:
    """The base model's :class:`Classifier`, with each track's embedding mapped to the
    owner's genres. ``bundle`` is the head (its labels, its identity in the database)."""

    def __init__(self, bundle: HeadBundle, **kwargs: Any):
        self.bundle = bundle
        self.base = Classifier(bundle.base, **kwargs)

    @property
    def labels(self) -> list[str]:
        return self.bundle.labels

    def __getattr__(self, name: str) -> Any:  # workers, batch_size, predict_windows, ...
        base = self.__dict__.get("base")
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)

    def __setattr__(self, name: str, value: Any) -> None:  # the daemon sets batch_size on SIGHUP
        if name in ("bundle", "base"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.base, name, value)

    def classify(self, paths: Iterable[str | Path]) -> Iterator[Classification]:
        for r in self.base.classify(paths):
            if not r.ok:
                yield r
            elif r.embedding is None:
                yield replace(r, probabilities={}, error=f"the model {self.bundle.base.name} gives no embedding for the learnt genres")
            else:
                p = self.bundle.probabilities(r.embedding)[0]
                yield replace(r, probabilities={g: float(v) for g, v in zip(self.labels, p, strict=True)})

    def close(self) -> None:
        self.base.close()

    def __enter__(self) -> HeadClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_classifier(bundle: Bundle | HeadBundle, **kwargs: Any) -> Classifier | HeadClassifier:
    """The classifier for any bundle (``batch_size``, ``max_windows``, ``workers`` as for Classifier)."""
    if isinstance(bundle, HeadBundle):
        return HeadClassifier(bundle, **kwargs)
    return Classifier(bundle, **kwargs)
