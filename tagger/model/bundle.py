"""A model bundle: the ``.keras`` file plus what is needed to trust it.

``bundle.json`` records the genre labels, the representation parameters (with
their version), a summary of the training data, metrics and the date. A bundle
whose representation differs from this code's is refused: it would be fed
windows unlike the ones it learned from and answer confidently wrong.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .. import features, quiet

MODEL_FILE = "model.keras"
META_FILE = "bundle.json"


class BundleError(Exception):
    """The bundle is missing, unreadable or made for another representation."""


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
        """The Keras model, loaded on first use (keeps ``tagger query`` free of TensorFlow)."""
        if self._model is None:
            quiet.load_backend()
            import keras

            from . import densenet  # noqa: F401  (registers the custom layer)

            try:
                self._model = keras.saving.load_model(self.path / MODEL_FILE, compile=False)
            except Exception as exc:  # keras raises many types for a bad file
                raise BundleError(f"{self.path}: cannot load {MODEL_FILE}: {str(exc).splitlines()[0]}") from exc
        return self._model


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


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Read and check a bundle; the Keras model itself loads lazily."""
    path = Path(path) if path else default_bundle_dir()
    if path.is_file() and path.name == META_FILE:
        path = path.parent
    meta_path = path / META_FILE
    if not meta_path.is_file() or not (path / MODEL_FILE).is_file():
        raise BundleError(f"{path}: not a model bundle (needs {MODEL_FILE} and {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{meta_path}: unreadable: {exc}") from exc
    check_representation(meta.get("representation", {}))
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels:
        raise BundleError(f"{meta_path}: no genre labels")
    return Bundle(path, [str(x) for x in labels], meta, file_sha256(path / MODEL_FILE))


def save_bundle(
    out_dir: str | Path,
    model,
    labels: list[str],
    *,
    name: str,
    training: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Bundle:
    """Write ``model.keras`` and ``bundle.json`` (atomically enough: model first, metadata last)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MODEL_FILE}.tmp.keras"
    model.save(tmp)
    tmp.replace(out / MODEL_FILE)
    meta = {
        "name": name,
        "labels": list(labels),
        "representation": features.representation_params(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "training": training,
        "metrics": metrics,
        **(extra or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return load_bundle(out)
