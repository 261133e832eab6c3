"""Logging to stderr, in a form journald shows well.

Under systemd (``$JOURNAL_STREAM`` names our stderr, or ``$INVOCATION_ID`` is set) lines
are ``<N>LEVEL logger: message``: journald strips the ``<N>`` prefix and files the line
under that syslog priority (``journalctl -p warning`` works), and it adds the timestamp
itself. Anywhere else lines carry a local timestamp.
"""

from __future__ import annotations

import logging
import os
import sys

from tagger.paths import escape_streams

#: syslog priorities (sd-daemon(3) prefixes) for Python's levels.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def under_journald(stream=None) -> bool:
    """True when stderr is connected to the journal (or we run in a systemd unit)."""
    stream = stream or sys.stderr
    js = os.environ.get("JOURNAL_STREAM")
    if js:
        try:
            dev, ino = (int(x) for x in js.split(":", 1))
            st = os.fstat(stream.fileno())
            if (st.st_dev, st.st_ino) == (dev, ino):
                return True
        except (ValueError, OSError, AttributeError):
            pass
    return bool(os.environ.get("INVOCATION_ID"))


class JournalFormatter(logging.Formatter):
    """``<prio>LEVEL name: message``; continuation lines (tracebacks) are indented."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{prio}>" + text.replace("\n", "\n  ")


def setup(verbose: int = 0, *, stream=None) -> None:
    """Configure the root logger for the daemon: INFO by default, DEBUG with ``-vv``."""
    stream = stream or sys.stderr
    escape_streams(stream)  # a file name that is not UTF-8 is logged as caf\xe9.mp3
    handler = logging.StreamHandler(stream)
    if under_journald(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    # Libraries that are chatty at INFO (APScheduler logs every run of every job).
    quiet = logging.INFO if verbose > 1 else logging.WARNING
    for name in ("apscheduler", "watchdog", "alembic", "absl", "tensorflow", "h5py", "numba", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(quiet)
