"""The pretrained teacher (musicnn) and the bridge from our representation to its input.

Training side only: neither ``tagger scan`` nor the daemon imports it, and the model
layer never does (a bundle's run-time side is ``model.onnx``).
"""

from __future__ import annotations

from pathlib import Path


def load_keras(path: str | Path):
    """A bundle's ``model.keras`` whatever route made it, the teacher's layers registered."""
    from ..model.export import load_keras as _load
    from . import branch, melstats, musicnn  # noqa: F401  (register the teacher route's layers with Keras)

    return _load(path)
