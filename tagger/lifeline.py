"""Helper processes die with the process that started them, even after ``kill -9``.

A killed ``tagger scan`` (``kill -9``, the OOM killer) used to leave its decode
processes behind with parent 1, about 200 MB a crash, for good: the fork server
and each worker hold the pipes that would tell them the parent is gone. Linux
can send a signal to a process when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
we ask for SIGKILL:

* in the ``forkserver`` of :class:`tagger.model.infer.Classifier`, by putting this
  module on the fork server's preload list (:func:`forkserver_preload`): imported
  there, it arms the fork server against the death of the process that started
  it, and every process the fork server forks against the fork server's death;
* in the training jobs, which call :func:`die_with_parent` themselves.

``multiprocessing``'s resource tracker then sees the last of them go and exits
too, after removing what they left. Elsewhere (not Linux, no libc) nothing
happens; importing this module outside a fork server does nothing either.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies.

    ``parent`` is the pid the parent should have (default: the parent now); if it
    already died before the request was made, exit at once. False where the
    kernel cannot be asked (not Linux).
    """
    parent = os.getppid() if parent is None else parent
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux, or no libc
        return False
    if os.getppid() != parent:  # the parent died before we asked
        os._exit(1)
    return True


def forkserver_preload(extra: tuple[str, ...] = ()) -> list[str]:
    """The fork server's preload list: the default (``__main__``), this module, ``extra``."""
    return list(dict.fromkeys(["__main__", __name__, *extra]))


def _in_fork_server() -> bool:
    return sys.platform == "linux" and sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules


if _in_fork_server():
    die_with_parent()
    _server = os.getpid()
    os.register_at_fork(after_in_child=lambda: die_with_parent(_server))
