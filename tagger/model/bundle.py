"""A model bundle: ``model.onnx`` (run time), ``model.keras`` (training) and what is needed to trust them.

``bundle.json`` records the genre labels, the representation parameters (with
their version), a summary of the training data, metrics, the date and, under
``onnx``, the export of ``model.keras`` to ``model.onnx`` (which file it was made
from, how far its outputs were from Keras). A bundle whose representation differs
from this code's is refused: it would be fed windows unlike the ones it learned
from and answer confidently wrong. So is a ``model.onnx`` that was not exported
from the ``model.keras`` beside it (retrained, not re-exported: ``tagger export``).

The bundle's identity (``sha256``, the model's key in the database and the id in
the tags tagger writes) is the sha256 of ``model.keras``, the trained weights: it
does not change when the same weights are exported again. A bundle that ships only
``model.onnx`` keeps the identity recorded at export, else takes the sha256 of
``model.onnx``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .. import features

MODEL_FILE = "model.keras"
ONNX_FILE = "model.onnx"
META_FILE = "bundle.json"


class BundleError(Exception):
    """The bundle is missing, unreadable, stale or made for another representation."""


def default_bundle_dir() -> Path:
    """The model shipped inside the package."""
    return Path(str(resources.files("tagger") / "models" / "default"))


@dataclass
class Bundle:
    path: Path
    labels: list[str]
    meta: dict[str, Any]
    sha256: str
    _model: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def model(self):
        """The ONNX Runtime session (:class:`~tagger.model.runtime.OnnxModel`), made on first use.

        Lazy, so that ``tagger query`` and friends load no runtime at all.
        """
        if self._model is None:
            from .runtime import OnnxModel, RuntimeLoadError

            try:
                self._model = OnnxModel(self.path / ONNX_FILE, cpu_chunk=self.meta.get("runtime", {}).get("cpu_chunk"))
            except RuntimeLoadError as exc:
                raise BundleError(f"{self.path}: cannot load {ONNX_FILE}: {exc}") from exc
        return self._model

    @property
    def loaded(self) -> bool:
        """Whether :attr:`model` has made its session (it does so on first use)."""
        return self._model is not None

    def release(self) -> bool:
        """Drop the ONNX Runtime session and its working memory; :attr:`model` makes it again."""
        if self._model is None:
            return False
        self._model = None
        import gc

        from .runtime import trim_heap

        gc.collect()
        trim_heap()
        return True


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_representation(recorded: dict[str, Any]) -> None:
    """Refuse a bundle made for another representation, saying what differs."""
    current = features.representation_params()
    if recorded.get("version") != current["version"]:
        raise BundleError(
            f"model was trained on representation version {recorded.get('version')}, "
            f"this tagger computes version {current['version']}: retrain it with `tagger train`"
        )
    diffs = [f"{k}={recorded.get(k)!r} (code: {v!r})" for k, v in current.items() if recorded.get(k) != v]
    if diffs:
        raise BundleError("model's representation differs from this tagger's: " + ", ".join(diffs))


def read_meta(path: Path) -> dict[str, Any]:
    """``bundle.json``, checked: readable, this representation, genre labels."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"{path}: not a model bundle (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{meta_path}: unreadable: {exc}") from exc
    check_representation(meta.get("representation", {}))
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels:
        raise BundleError(f"{meta_path}: no genre labels")
    return meta


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Read and check a bundle; the ONNX Runtime session itself is made lazily."""
    path = Path(path) if path else default_bundle_dir()
    if path.is_file() and path.name == META_FILE:
        path = path.parent
    onnx_file, keras_file = path / ONNX_FILE, path / MODEL_FILE
    if not onnx_file.is_file():
        if keras_file.is_file() and (path / META_FILE).is_file():
            raise BundleError(f"{path}: no {ONNX_FILE} beside {MODEL_FILE}: run `tagger export {path}` (needs the train extra)")
        raise BundleError(f"{path}: not a model bundle (needs {ONNX_FILE} and {META_FILE})")
    meta = read_meta(path)
    record = meta.get("onnx") or {}
    onnx_sha = file_sha256(onnx_file)
    if record.get("sha256") and record["sha256"] != onnx_sha:
        raise BundleError(f"{path}: {ONNX_FILE} is not the file {META_FILE} records: run `tagger export {path}`")
    if keras_file.is_file():
        identity = file_sha256(keras_file)
        if record.get("keras_sha256") != identity:
            raise BundleError(f"{path}: {ONNX_FILE} was not exported from this {MODEL_FILE}: run `tagger export {path}`")
    else:
        identity = record.get("keras_sha256") or onnx_sha
    return Bundle(path, [str(x) for x in meta["labels"]], meta, identity)
