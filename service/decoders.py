"""The decode processes are warmed up when the daemon starts.

:class:`tagger.model.infer.Classifier` decodes in a ``forkserver`` pool, whose processes
die with the daemon even after ``kill -9`` (:mod:`tagger.lifeline`; under systemd
``KillMode=mixed`` cleans up as well). :func:`warm_up` is submitted to each decode process
at start-up so that the first file's latency does not include importing the audio
libraries and the first STFT.
"""

from __future__ import annotations

import contextlib
import os


def warm_up() -> int:
    """Import the decoders and run one window through the features (in a decode process)."""
    import numpy as np

    from tagger import audio, features  # noqa: F401

    rng = np.random.default_rng(0)
    features.window_matrix(rng.standard_normal(features.WINDOW_SAMPLES).astype(np.float32) * 0.1)
    for name in ("soundfile", "soxr", "av"):
        with contextlib.suppress(ImportError):
            __import__(name)
    return os.getpid()
