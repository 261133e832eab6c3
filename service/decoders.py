"""The decode processes: they die with the daemon, even after ``kill -9``, and are warmed up.

:class:`tagger.model.infer.Classifier` decodes in a ``forkserver`` pool. If the daemon is
killed outright, the fork server and its workers would linger (each worker holds the fork
server's "alive" pipe open, so neither ever sees the daemon go). The daemon adds this module
to the fork server's preload list; imported there, it asks the kernel to SIGKILL the fork
server when the daemon dies, and every process the fork server forks when the fork server
dies (``PR_SET_PDEATHSIG``). Under systemd ``KillMode=mixed`` cleans up as well; this
covers ``tagger serve`` started by hand. Importing it anywhere else does nothing.

:func:`warm_up` is submitted to each decode process at start-up so that the first file's
latency does not include importing the audio libraries and the first STFT.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except Exception:  # not Linux, or no libc: best effort
        return
    if os.getppid() == 1:  # the parent died before we asked
        os._exit(1)


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


def _in_fork_server() -> bool:
    return sys.platform == "linux" and sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules


if _in_fork_server():
    _die_with_parent()
    os.register_at_fork(after_in_child=_die_with_parent)
