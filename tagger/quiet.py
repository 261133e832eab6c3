"""Quiet by default: at normal verbosity, stderr holds tagger's own lines only.

Libraries under tagger talk on stderr about things a user can do nothing about.
Each measure here is scoped to messages known to be noise, so a real warning or
error still shows; ``-vv`` turns them all off (:func:`setup`).

* Environment, set before those libraries load and inherited by tagger's helper
  processes: ``TF_CPP_MIN_LOG_LEVEL=3`` (TensorFlow's C++ log), and a
  ``PYTHONWARNINGS`` entry for multiprocessing's resource tracker, a process of its
  own that reports the semaphores it cleaned up after a killed run
  ("leaked semaphore objects").
* A warnings filter for watchdog's ``RuntimeWarning: Callback with id ... already
  exists``: when a folder tree is copied in, watchdog adds the watch of a new
  sub-folder twice, harmlessly, and warns for each.
* :func:`native_stderr`: while TensorFlow loads, absl logs INFO lines straight to
  file descriptor 2 ("All log messages before absl::InitializeLog() ...",
  "oneDNN custom operations are on"), before ``TF_CPP_MIN_LOG_LEVEL`` applies
  and whatever the environment says. Lines of that form are dropped; anything
  else written meanwhile is passed on.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

#: Lines dropped by :func:`native_stderr`: absl's notice before its log is set up, and
#: absl INFO lines (``I0000 00:00:1700000000.123456  4242 port.cc:153] ...``: before absl
#: is set up, date and time are zeros and the epoch).
NATIVE_NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\] "
)
#: PYTHONWARNINGS entry: the resource tracker's report of what a killed run left behind.
RESOURCE_TRACKER = "ignore:resource_tracker:UserWarning:multiprocessing.resource_tracker"

_quiet = True


def setup(verbose: int = 0) -> None:
    """Called first thing by ``tagger`` and ``tagger serve``; ``-vv`` keeps everything."""
    global _quiet
    _quiet = verbose < 2
    if not _quiet:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    entries = [e for e in os.environ.get("PYTHONWARNINGS", "").split(",") if e]
    if RESOURCE_TRACKER not in entries:
        os.environ["PYTHONWARNINGS"] = ",".join([*entries, RESOURCE_TRACKER])
    warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning, module="watchdog")


@contextlib.contextmanager
def native_stderr() -> Iterator[None]:
    """Hold what C libraries write to file descriptor 2 during the block, then pass it on
    without the lines that match :data:`NATIVE_NOISE` (all of it if the block fails)."""
    held = None
    if _quiet and sys.platform != "win32":
        with contextlib.suppress(OSError):  # no temporary space: hold nothing back
            held = tempfile.TemporaryFile()  # noqa: SIM115 (closed below, by the with)
    if held is None:
        yield
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    failed = False
    with held:
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            out = b"".join(line for line in held.read().splitlines(keepends=True) if failed or not NATIVE_NOISE.match(line))
            if out:
                with contextlib.suppress(OSError):
                    os.write(2, out)


def load_backend() -> None:
    """Import Keras and its backend with their start-up chatter dropped (a no-op once loaded)."""
    if _quiet:  # also for a library user who never called setup()
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with native_stderr():
        import keras  # noqa: F401
