"""Read musicnn's pretrained weights from an installed ``musicnn`` package.

Training-side only (needs TensorFlow to read a TF-1 checkpoint; never imported by
scan or serve): the weights end up inside our own bundle. Install the package
without its dependencies — its metadata pins numpy < 1.17, which would wreck the
environment: ``pip install --no-deps musicnn==0.1.0``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

#: The model of the package we use: trained on ~200 k tracks of the Million Song Dataset.
MODEL = "MSD_musicnn"


class TeacherUnavailable(RuntimeError):
    """The musicnn package (or TensorFlow to read it) is not installed."""


def checkpoint_prefix(model: str = MODEL) -> Path:
    """Where the installed package keeps the checkpoint (its files are named ``.index`` etc.)."""
    spec = importlib.util.find_spec("musicnn")
    if spec is None or spec.origin is None:
        raise TeacherUnavailable("the musicnn package is not installed: pip install --no-deps musicnn==0.1.0")
    d = Path(spec.origin).parent / model
    if not (d / ".index").is_file():
        raise TeacherUnavailable(f"{d}: no checkpoint of {model} in the installed musicnn package")
    return d


def read_variables(model: str = MODEL) -> dict[str, np.ndarray]:
    """Every variable of the checkpoint (optimizer slots left out), by TF-1 name."""
    prefix = checkpoint_prefix(model)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError as exc:  # pragma: no cover - the train extra brings it
        raise TeacherUnavailable("reading the musicnn checkpoint needs TensorFlow: pip install '.[train]'") from exc
    # The package's ``checkpoint`` file names its author's paths: open the prefix directly.
    reader = tf.compat.v1.train.NewCheckpointReader(str(prefix) + os.sep)
    return {
        name: np.asarray(reader.get_tensor(name))
        for name in reader.get_variable_to_shape_map()
        if "Adam" not in name and not name.startswith("beta")
    }


def load_musicnn():
    """musicnn's ``MSD_musicnn`` as a Keras model with its pretrained weights (frozen)."""
    from .musicnn import build_musicnn, set_checkpoint_weights

    model = build_musicnn()
    set_checkpoint_weights(model, read_variables())
    return model
